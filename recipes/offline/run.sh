#!/usr/bin/env bash
# The offline mixed-bandwidth ASR + ST corpus (Asterisk prompts, Debian translations, TTS voices) from the installed
# packages to score table: the demo (run_demo.sh runs it after setup).
#   recipes/offline/run.sh [--mode quick|full]          (run recipes/offline/setup.sh once before stage 1)
#   recipes/offline/run.sh --mode quick --stage 5        (only the score table again)
# Stages: 1 build the corpus (recipes/offline/prep.sh --mode MODE), 2 train Base, DecFFNx2, DecS-MoE, EncDecS-MoE,
# 3 average the last K checkpoints (default 5), 4 decode every test set (WER with joint CTC/attention, BLEU), 5 score
# table -> EXP/results.{md,json,png}. --mode quick: 2 CPU cores, about 30 minutes; full: a GPU (mixed precision,
# min(8, cores) data-loader workers). Defaults: --data data/offline_MODE --exp exp/demo_MODE --preset MODE. Every
# option: recipes/stages.sh; the corpus options (after --): recipes/offline/prep.sh --help. Reruns skip finished work.
set -euo pipefail
recipe=offline
source "$(dirname "${BASH_SOURCE[0]}")/../stages.sh"
mode=quick
options=(mode)
preset=""
average=5
test_sets="test_*"
parse_options "$@"
case "$mode" in quick|full) ;; *) echo "$0: --mode $mode: quick or full" >&2; exit 2;; esac
preset="${preset:-$mode}"
data="${data:-$repo/data/offline_$mode}"
exp="${exp:-$repo/exp/demo_$mode}"
run_stages bash "$repo/recipes/offline/prep.sh" --out-dir "$data" --mode "$mode"
