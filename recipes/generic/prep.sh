#!/usr/bin/env bash
# S-MoE data directory from a folder of audio + a TSV of transcripts/translations:
# manifests, WB audio + telephone-band NB copies, SentencePiece vocabulary, config.yaml.
#   recipes/generic/prep.sh --tsv corpus.tsv --out-dir data/mine
# Options: recipes/generic/prep.sh --help (and the README's "Public corpora recipes").
# Rerunning skips finished work; an interrupted run leaves no half-written file.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m fairseq_smoe.prep.generic "$@"
