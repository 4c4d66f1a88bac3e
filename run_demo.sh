#!/usr/bin/env bash
# README command 1: set up everything, build the offline corpus, train and compare the paper's four systems.
#   bash run_demo.sh [quick|full]
# quick (default): 2 CPU cores, about 30 minutes after setup. full: a GPU (see README for run times).
# Writes exp/demo_<mode>/results.{md,json,png}. Rerunning skips every finished stage (setup, corpus, each
# system's training and each decoding); an interrupted stage resumes.
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
OMP_NUM_THREADS=1 bash recipes/offline/prep.sh --out-dir "$data" --mode "$mode"
t2=$(stamp)
step "4/4 train Base, DecFFNx2, DecS-MoE, EncDecS-MoE and decode every test set -> $out"
cpu_flag=""
[ "$mode" = quick ] || .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "[demo] full mode wants a GPU; none found, training on the CPU (slow)"; cpu_flag="--cpu"; }
.venv/bin/python -m fairseq_smoe.study.compare --data "$data" --out "$out" --preset "$mode" $cpu_flag
t3=$(stamp)
step "done: setup $((t1 - t0)) s, corpus $((t2 - t1)) s, train + decode $((t3 - t2)) s (this run; finished stages were skipped)"
step "results: $out/results.md, $out/results.json, $out/results.png"
