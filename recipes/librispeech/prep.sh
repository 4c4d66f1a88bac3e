#!/usr/bin/env bash
# S-MoE data directory from LibriSpeech (English ASR):
# manifests, WB audio + telephone-band NB copies, SentencePiece vocabulary, config.yaml.
#   recipes/librispeech/prep.sh --librispeech-root /corpora/LibriSpeech --out-dir data/librispeech
# Options: recipes/librispeech/prep.sh --help (and the README's "Public corpora recipes").
# Rerunning skips finished work; an interrupted run leaves no half-written file.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m fairseq_smoe.prep.librispeech "$@"
