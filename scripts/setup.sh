#!/usr/bin/env bash
# One-command setup: makes .venv and installs the tested stack (requirements/constraints.txt) plus this package.
# Idempotent: a rerun only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
C=requirements/constraints.txt

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
P="$VENV/bin/python"
"$P" -m pip install -q --upgrade "pip<26" setuptools wheel
# torch/torchaudio first, then numpy/cython, so fairseq builds against them (no second torch in an isolated build).
echo "[setup] torch + torchaudio"
"$P" -m pip install -q -c "$C" torch torchaudio
echo "[setup] build tools"
"$P" -m pip install -q -c "$C" numpy cython
if ! "$P" -c "import fairseq" 2>/dev/null; then
  echo "[setup] fairseq (compiled, ~5 min)"
  if "$P" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    "$P" -m pip install -q --no-build-isolation -c "$C" fairseq-fixed
  else
    "$P" -m pip install -q --no-build-isolation "fairseq==0.12.2"
  fi
fi
echo "[setup] plugin + test tools"
"$P" -m pip install -q -c "$C" -e ".[test,demo]"
"$P" -c "import fairseq, torch, torchaudio, fairseq_smoe; print('[setup] ok: fairseq', fairseq.__version__, 'torch', torch.__version__, 'torchaudio', torchaudio.__version__)"
