#!/usr/bin/env bash
# One-command setup: makes a virtual environment and installs the tested stack plus this package.
# Idempotent: a rerun only installs what is missing.
#   bash scripts/setup.sh                                   # .venv, Python 3.11, requirements/constraints.txt
#   PYTHON=python3.12 VENV=.venv312 bash scripts/setup.sh   # Python 3.12 + numpy 2, requirements/constraints-py312.txt
# Env: PYTHON (interpreter for a new venv), VENV (its folder), CONSTRAINTS (override the constraint file),
#      EXTRAS (the package extras, default "test,demo"; CI's second environment uses "test").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-test,demo}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
P="$VENV/bin/python"
# Python >= 3.12: numpy 2 and fairseq-fixed's cp312 wheel; older: numpy 1.26 and fairseq compiled here.
if "$P" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)'; then PY312=1; else PY312=0; fi
if [ -z "${CONSTRAINTS:-}" ]; then
  if [ "$PY312" = 1 ]; then CONSTRAINTS=requirements/constraints-py312.txt; else CONSTRAINTS=requirements/constraints.txt; fi
fi
C=$CONSTRAINTS
[ -f "$C" ] || { echo "[setup] constraint file not found: $C" >&2; exit 2; }
echo "[setup] $("$P" -c 'import sys; print(sys.version.split()[0])') in $VENV, constraints $C"
# setuptools<82: torch 2.11 requires it (pip reports a dependency ERROR with setuptools 82).
"$P" -m pip install -q --upgrade "pip<26" "setuptools<82" wheel
# torch/torchaudio first, then numpy/cython, so fairseq builds against them (no second torch in an isolated build).
echo "[setup] torch + torchaudio"
"$P" -m pip install -q -c "$C" torch torchaudio "setuptools<82"
if ! "$P" -c "import fairseq" 2>/dev/null; then
  if [ "$PY312" = 1 ]; then
    echo "[setup] numpy + fairseq-fixed (cp312 wheel, nothing compiled)"
    "$P" -m pip install -q -c "$C" --only-binary=fairseq-fixed,numpy numpy fairseq-fixed "setuptools<82"
  else
    echo "[setup] build tools"
    "$P" -m pip install -q -c "$C" numpy cython
    echo "[setup] fairseq (compiled, ~5 min)"
    if "$P" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
      "$P" -m pip install -q --no-build-isolation -c "$C" fairseq-fixed
    else
      "$P" -m pip install -q --no-build-isolation "fairseq==0.12.2"
    fi
  fi
fi
echo "[setup] plugin + test tools"
"$P" -m pip install -q -c "$C" -e ".[$EXTRAS]" "setuptools<82"
"$P" -c "import fairseq, numpy, torch, torchaudio, fairseq_smoe; print('[setup] ok: fairseq', fairseq.__version__, 'torch', torch.__version__, 'torchaudio', torchaudio.__version__, 'numpy', numpy.__version__)"
