#!/usr/bin/env bash
# Prepare an S-MoE data directory from MuST-C (manifests, NB copies, SentencePiece vocabulary, config.yaml).
#   recipes/mustc/prep.sh --mustc-root /corpora/MUSTC_v1.0 --langs de[,es,...] --out-dir data/mustc [--bandwidths wb,nb] [--workers N]
# All options: recipes/mustc/prep.sh --help. Rerunning skips finished work; an interrupted run leaves no half-written file.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m fairseq_smoe.prep.mustc "$@"
