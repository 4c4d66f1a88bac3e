#!/usr/bin/env bash
# S-MoE data directory from CoVoST 2 on Common Voice (ASR + ST):
# manifests, WB audio + telephone-band NB copies, SentencePiece vocabulary, config.yaml.
#   recipes/covost2/prep.sh --cv-root /corpora/cv-corpus-4/en --tgt-lang de --out-dir data/covost2
# Options: recipes/covost2/prep.sh --help (and the README's "Public corpora recipes").
# Rerunning skips finished work; an interrupted run leaves no half-written file.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m fairseq_smoe.prep.covost2 "$@"
