#!/usr/bin/env bash
# Prepare an S-MoE data directory from LibriSpeech, ASR only (manifests, NB copies, SentencePiece vocabulary, config.yaml).
#   recipes/librispeech/prep.sh --librispeech-root /corpora/LibriSpeech --out-dir data/librispeech [--bandwidths wb,nb] [--workers N]
# All options: recipes/librispeech/prep.sh --help. Rerunning skips finished work; an interrupted run leaves no half-written file.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m fairseq_smoe.prep.librispeech "$@"
