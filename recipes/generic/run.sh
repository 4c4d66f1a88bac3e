#!/usr/bin/env bash
# A folder of audio + a TSV of transcripts/translations, from corpus to score table.
#   recipes/generic/run.sh -- --tsv corpus.tsv
#   recipes/generic/run.sh --stage 2 --stop-stage 3 --systems s2t_dec_smoe --average 10
# Stages: 1 prepare data (recipes/generic/prep.sh), 2 train Base, DecFFNx2, DecS-MoE, EncDecS-MoE, 3 average the last K
# checkpoints, 4 decode every test* split (WER for ASR with joint CTC/attention, BLEU for ST), 5 score table -> EXP/results.{md,json,png}.
# Default: a GPU (mixed precision, min(8, cores) data-loader workers); --cpu, --smoke (CI size). Every option:
# recipes/stages.sh; the prep options (after --): recipes/generic/prep.sh --help. Reruns skip finished work.
set -euo pipefail
recipe=generic
source "$(dirname "${BASH_SOURCE[0]}")/../stages.sh"
test_sets="test*"
parse_options "$@"
data="${data:-$repo/data/generic}"
exp="${exp:-$repo/exp/generic}"
run_stages bash "$repo/recipes/generic/prep.sh" --out-dir "$data"
