#!/usr/bin/env bash
# LibriSpeech (English ASR; WB and telephone-band NB copies) from corpus to score table.
#   recipes/librispeech/run.sh -- --librispeech-root /corpora/LibriSpeech
#   recipes/librispeech/run.sh --stage 2 --stop-stage 3 --systems s2t_dec_smoe --average 10
# Stages: 1 prepare data (recipes/librispeech/prep.sh), 2 train Base, DecFFNx2, DecS-MoE, EncDecS-MoE, 3 average the last K
# checkpoints, 4 decode test-clean and test-other (WER; joint CTC/attention too), 5 score table -> EXP/results.{md,json,png}.
# Default: a GPU (mixed precision, min(8, cores) data-loader workers); --cpu, --smoke (CI size). Every option:
# recipes/stages.sh; the prep options (after --): recipes/librispeech/prep.sh --help. Reruns skip finished work.
set -euo pipefail
recipe=librispeech
source "$(dirname "${BASH_SOURCE[0]}")/../stages.sh"
test_sets="test-clean_*,test-other_*"
valid_subset="dev-clean"
train_subset=""  # default: every train-* split prepared (after stage 1)
parse_options "$@"
data="${data:-$repo/data/librispeech}"
exp="${exp:-$repo/exp/librispeech}"
# fairseq's LibriSpeech recipe trains on all 960 h: every train-* split stage 1 wrote
after_prep() {
  [ -n "$train_subset" ] && return 0
  train_subset="$(cd "$data" 2>/dev/null && ls train-*.tsv 2>/dev/null | grep -v _ | sed 's/\.tsv$//' | paste -sd, - || true)"
  [ -n "$train_subset" ] || train_subset="train-clean-100,train-clean-360,train-other-500"
}
run_stages bash "$repo/recipes/librispeech/prep.sh" --out-dir "$data"
