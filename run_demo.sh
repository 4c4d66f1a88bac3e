#!/usr/bin/env bash
# README command 1: set up everything, build the offline corpus, train and compare the paper's four systems.
#   bash run_demo.sh [quick|full]
# quick (default): 2 CPU cores, about 30 minutes after setup. full: a GPU (see README for run times).
# Steps 3 and 4 are the offline recipe, recipes/offline/run.sh (stage 1; stages 2-5: train, average the last 5
# checkpoints of each system, decode every test set with the average, score table).
# Writes exp/demo_<mode>/results.{md,json,png}. Rerunning skips every finished stage (setup, corpus, each
# system's training, each average and each decoding); an interrupted stage resumes.
set -euo pipefail
mode="${1:-quick}"
case "$mode" in quick|full) ;; *) echo "usage: bash run_demo.sh [quick|full]" >&2; exit 2;; esac
cd "$(dirname "${BASH_SOURCE[0]}")"
data="data/offline_$mode"
out="exp/demo_$mode"
mkdir -p "$out"
log="$out/run_demo.log"
stamp() { date +%s; }
step() { echo "[demo $(date +%H:%M:%S)] $*" | tee -a "$log"; }

t0=$(stamp)
step "1/4 system packages (apt) + Debian description translations"
bash recipes/offline/setup.sh data/offline_src/translations
step "2/4 Python environment (scripts/setup.sh)"
bash scripts/setup.sh
t1=$(stamp)
step "3/4 offline corpus -> $data"
# the recipe's own defaults are these two folders (as absolute paths): a later recipes/offline/run.sh finds this run
OMP_NUM_THREADS=1 bash recipes/offline/run.sh --mode "$mode" --stage 1 --stop-stage 1
t2=$(stamp)
step "4/4 train Base, DecFFNx2, DecS-MoE, EncDecS-MoE, average the last 5 checkpoints of each and decode every test set -> $out"
# full mode without a GPU: the recipe says so and trains on the CPU (slow)
bash recipes/offline/run.sh --mode "$mode" --stage 2
t3=$(stamp)
step "done: setup $((t1 - t0)) s, corpus $((t2 - t1)) s, train + decode $((t3 - t2)) s (this run; finished stages were skipped)"
step "results: $out/results.md, $out/results.json, $out/results.png"
