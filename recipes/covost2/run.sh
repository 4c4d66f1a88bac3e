#!/usr/bin/env bash
# CoVoST 2 on Common Voice (ASR + ST; WB and telephone-band NB copies) from corpus to score table.
#   recipes/covost2/run.sh -- --cv-root /corpora/cv-corpus-4/en --tgt-lang de
#   recipes/covost2/run.sh --stage 2 --stop-stage 3 --systems s2t_dec_smoe --average 10
# Stages: 1 prepare data (recipes/covost2/prep.sh), 2 train Base, DecFFNx2, DecS-MoE, EncDecS-MoE, 3 average the last K
# checkpoints, 4 decode test (WER for ASR with joint CTC/attention, BLEU for ST), 5 score table -> EXP/results.{md,json,png}.
# Default: a GPU (mixed precision, min(8, cores) data-loader workers); --cpu, --smoke (CI size). Every option:
# recipes/stages.sh; the prep options (after --): recipes/covost2/prep.sh --help. Reruns skip finished work.
set -euo pipefail
recipe=covost2
source "$(dirname "${BASH_SOURCE[0]}")/../stages.sh"
test_sets="test_*"
parse_options "$@"
data="${data:-$repo/data/covost2}"
exp="${exp:-$repo/exp/covost2}"
run_stages bash "$repo/recipes/covost2/prep.sh" --out-dir "$data"
