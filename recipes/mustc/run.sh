#!/usr/bin/env bash
# MuST-C (English ASR + en->X ST; WB and telephone-band NB copies) from corpus to score table.
#   recipes/mustc/run.sh -- --mustc-root /corpora/MUSTC_v1.0 --langs de,es
#   recipes/mustc/run.sh --stage 2 --stop-stage 3 --systems s2t_dec_smoe --average 10
# Stages: 1 prepare data (recipes/mustc/prep.sh), 2 train Base, DecFFNx2, DecS-MoE, EncDecS-MoE, 3 average the last K
# checkpoints, 4 decode tst-COMMON (WER for ASR with joint CTC/attention, BLEU for ST), 5 score table -> EXP/results.{md,json,png}.
# Default: a GPU (mixed precision, min(8, cores) data-loader workers); --cpu, --smoke (CI size). Every option:
# recipes/stages.sh; the prep options (after --): recipes/mustc/prep.sh --help. Reruns skip finished work.
set -euo pipefail
recipe=mustc
source "$(dirname "${BASH_SOURCE[0]}")/../stages.sh"
test_sets="tst-COMMON_*"
parse_options "$@"
data="${data:-$repo/data/mustc}"
exp="${exp:-$repo/exp/mustc}"
run_stages bash "$repo/recipes/mustc/prep.sh" --out-dir "$data"
