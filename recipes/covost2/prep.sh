#!/usr/bin/env bash
# Prepare an S-MoE data directory from CoVoST 2 on Common Voice (manifests, NB copies, SentencePiece vocabulary, config.yaml).
#   recipes/covost2/prep.sh --cv-root /corpora/cv-corpus-4/en --src-lang en --tgt-lang de --out-dir data/covost2 [--bandwidths wb,nb] [--workers N]
# All options: recipes/covost2/prep.sh --help. Rerunning skips finished work; an interrupted run leaves no half-written file.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m fairseq_smoe.prep.covost2 "$@"
