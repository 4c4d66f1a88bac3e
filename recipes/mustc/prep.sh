#!/usr/bin/env bash
# S-MoE data directory from MuST-C (English ASR + en->X ST):
# manifests, WB audio + telephone-band NB copies, SentencePiece vocabulary, config.yaml.
#   recipes/mustc/prep.sh --mustc-root /corpora/MUSTC_v1.0 --langs de,es --out-dir data/mustc
# Options: recipes/mustc/prep.sh --help (and the README's "Public corpora recipes").
# Rerunning skips finished work; an interrupted run leaves no half-written file.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m fairseq_smoe.prep.mustc "$@"
