#!/usr/bin/env bash
# Build the offline GPU bundle: everything a GPU node without network needs to install this plugin and run the GPU
# test suite (tests/gpu) and benchmarks/speed.py, on top of an image that already has torch, torchaudio, numpy,
# sentencepiece and sacrebleu. Run it on a machine with PyPI access and flite (the test corpus is made here).
#
#   bash scripts/offline_bundle.sh [OUT_DIR]        # default OUT_DIR: bundle/ (git-ignored, rebuilt, never committed)
#   carry OUT_DIR to the node, then there:  bash OUT_DIR/node.sh [RESULTS_DIR]   (default $OUT, else ./smoe_gpu_out)
#
# Env: NODE_PYTHON_VERSION (the node's Python, default 3.12: wheels are fetched for cp<that> manylinux_2_28 x86_64),
#      BUILD_PYTHON (a Python with this plugin, flite-capable deps and pip; default .venv312 or .venv),
#      WITH_SKLEARN=1 (also ship scikit-learn + scipy, ~45 MB more: over the 60 MB budget, see node.sh),
#      MAX_MB (fail when the bundle is larger; default 60).
#
# Layout: wheels/ (the wheelhouse), requirements-node.txt (what node.sh installs, --no-deps --no-index),
#         src/ (fairseq_smoe, tests, benchmarks: the suite runs from there), corpus/ (a fixture corpus, paths relative
#         to it), node.sh, bundle_summary.py, fairseq_optional_imports.py, BUNDLE_INFO.json.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR=${1:-$REPO/bundle}
PYV=${NODE_PYTHON_VERSION:-3.12}
MAX_MB=${MAX_MB:-60}
if [ -z "${BUILD_PYTHON:-}" ]; then
  for cand in "$REPO/.venv312/bin/python" "$REPO/.venv/bin/python"; do
    [ -x "$cand" ] && { BUILD_PYTHON=$cand; break; }
  done
fi
[ -n "${BUILD_PYTHON:-}" ] && [ -x "$BUILD_PYTHON" ] || {
  echo "[bundle] no BUILD_PYTHON: run scripts/setup.sh first or set BUILD_PYTHON=<python with fairseq_smoe>" >&2; exit 2; }
command -v flite >/dev/null || { echo "[bundle] flite is not installed (apt-get install flite): the test corpus needs it" >&2; exit 2; }
case "$PYV" in 3.[0-9]|3.[0-9][0-9]) ;; *) echo "[bundle] NODE_PYTHON_VERSION=$PYV: expected e.g. 3.12" >&2; exit 2;; esac
TAG=cp${PYV/./}
C=$REPO/requirements/constraints-py312.txt
[ "$PYV" = 3.11 ] && C=$REPO/requirements/constraints.txt
start=$(date +%s)

case "$OUT_DIR" in /*) ;; *) OUT_DIR=$PWD/$OUT_DIR;; esac
if [ -e "$OUT_DIR" ] && [ ! -f "$OUT_DIR/BUNDLE_INFO.json" ] && [ -n "$(ls -A "$OUT_DIR" 2>/dev/null)" ]; then
  echo "[bundle] $OUT_DIR exists and is not a bundle: refusing to overwrite it" >&2; exit 2
fi
TMP="$OUT_DIR.tmp.$$"
rm -rf "$TMP"; mkdir -p "$TMP/wheels"
trap 'rm -rf "$TMP"' EXIT

# The node installs exactly these, with --no-deps: fairseq-fixed's declared scikit-learn and cython are left out on
# purpose (see fairseq_optional_imports.py); torch, torchaudio, numpy, sentencepiece, sacrebleu come with the image.
PKGS="fairseq-fixed hydra-core omegaconf antlr4-python3-runtime bitarray editdistance soundfile cffi pycparser
PyYAML regex portalocker tqdm packaging pytest iniconfig pluggy pip webrtcvad-wheels"
[ "${WITH_SKLEARN:-0}" = 1 ] && PKGS="$PKGS scikit-learn scipy joblib threadpoolctl"
pins=()
for p in $PKGS; do
  pin=$(grep -i -E "^${p//-/[-_]}==" "$C" || true)
  [ "$p" = pip ] && pin="pip<26"
  [ -n "$pin" ] || { echo "[bundle] $p has no pin in $C" >&2; exit 2; }
  pins+=("$pin")
done
# A manylinux_2_28 node (glibc >= 2.28) also runs every older manylinux wheel; pip does not expand the tag itself.
PLATFORMS=""
for g in $(seq 28 -1 5); do PLATFORMS="$PLATFORMS --platform manylinux_2_${g}_x86_64"; done
PLATFORMS="$PLATFORMS --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64"
echo "[bundle] wheels for $TAG manylinux_2_28_x86_64 (${#pins[@]} packages, pins from ${C#$REPO/})"
# antlr4-python3-runtime 4.9.3 is an sdist only: build its (pure Python) wheel here.
"$BUILD_PYTHON" -m pip wheel -q --no-deps -w "$TMP/wheels" "$(printf '%s\n' "${pins[@]}" | grep -i '^antlr4')"
"$BUILD_PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$TMP/wheels" \
  --python-version "$PYV" --implementation cp --abi "$TAG" --abi abi3 --abi none $PLATFORMS \
  $(printf '%s\n' "${pins[@]}" | grep -v -i '^antlr4')
echo "[bundle] the plugin as a wheel"
"$BUILD_PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$TMP/wheels" "$REPO" 2>&1 | grep -v -E "^WARNING: Location|egg_info" || true
ls "$TMP/wheels"/fairseq_smoe-*.whl >/dev/null
rm -rf "$REPO/build"  # pip wheel's leftovers (git-ignored)
{ printf '%s\n' "${pins[@]}" | grep -v -i '^pip<' | sed 's/==.*//'; echo fairseq_smoe; } > "$TMP/requirements-node.txt"

echo "[bundle] sources: fairseq_smoe, tests, docs, benchmarks/speed.py"
mkdir -p "$TMP/src/benchmarks"
(cd "$REPO" && tar cf - --exclude=__pycache__ --exclude='*.pyc' fairseq_smoe tests setup.py README.md docs) | tar xf - -C "$TMP/src"
cp "$REPO/benchmarks/speed.py" "$TMP/src/benchmarks/"
[ -d "$TMP/src/tests/gpu" ] || echo "[bundle] warning: tests/gpu is missing: node.sh will have no GPU suite to run" >&2

echo "[bundle] test corpus (flite, tests/fixture_corpus.py)"
(cd "$REPO/tests" && OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$BUILD_PYTHON" - "$TMP/corpus" <<'PY'
import json, sys
from pathlib import Path
from fixture_corpus import make_corpus
info = make_corpus(Path(sys.argv[1]))
print(f"[bundle] corpus: {info['clips']} clips, rows {json.dumps(info['rows'])}")
PY
) 2>&1 | grep -v -E "^INFO:fairseq|tensorboardX"
# Relocatable: manifests' audio paths and config.yaml's vocab files are relative to the corpus folder.
if grep -q -F "$TMP" "$TMP"/corpus/*.tsv "$TMP/corpus/config.yaml"; then
  echo "[bundle] the corpus holds absolute paths: it would break once moved" >&2; exit 1
fi

cp "$REPO/scripts/offline/node.sh" "$REPO/scripts/offline/bundle_summary.py" \
   "$REPO/scripts/offline/fairseq_optional_imports.py" "$TMP/"
commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$REPO" status --porcelain 2>/dev/null | { grep -v '^??' || true; } | wc -l)
"$BUILD_PYTHON" - "$TMP" "$PYV" "$commit" "$dirty" "$(( $(date +%s) - start ))" <<'PY'
import json, os, sys, time
from pathlib import Path
root, pyv, commit, dirty, secs = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
info = {
    "python": pyv, "built": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "commit": commit,
    "uncommitted_changes": dirty, "build_seconds": secs,
    "wheels": sorted(f.name for f in (root / "wheels").glob("*.whl")),
    "bytes": {"total": size(root), "wheels": size(root / "wheels"), "corpus": size(root / "corpus"),
              "src": size(root / "src")},
}
(root / "BUNDLE_INFO.json").write_text(json.dumps(info, indent=1) + "\n")
PY
total=$(du -sb "$TMP" | cut -f1)
if [ "$total" -gt $(( MAX_MB * 1000000 )) ]; then
  echo "[bundle] $((total / 1000000)) MB is over MAX_MB=$MAX_MB" >&2; exit 1
fi
rm -rf "$OUT_DIR"; mv "$TMP" "$OUT_DIR"; trap - EXIT
echo "[bundle] ok: $OUT_DIR, $((total / 1000)) kB ($(ls "$OUT_DIR/wheels" | wc -l) wheels), $(( $(date +%s) - start )) s"
echo "[bundle] on the node: bash $OUT_DIR/node.sh [RESULTS_DIR]"
