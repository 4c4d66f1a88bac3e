#!/usr/bin/env bash
# Build the offline mixed-bandwidth ASR + ST corpus (Asterisk prompts + Debian translations + TTS voices).
#   recipes/offline/prep.sh --out-dir data/offline_quick [--mode quick|full] [--workers N]
# Run recipes/offline/setup.sh first (system packages + translations). All options: --help.
# Rerunning skips finished work; an interrupted run leaves no half-written file.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m fairseq_smoe.prep.offline --translations "${TRANSLATIONS:-$repo/data/offline_src/translations}" "$@"
