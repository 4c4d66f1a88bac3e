#!/usr/bin/env bash
# Run on a GPU node without network, from the offline bundle (scripts/offline_bundle.sh):
#   bash bundle/node.sh [RESULTS_DIR]        # default: $OUT, else ./smoe_gpu_out
# 1. makes (or reuses) a virtual environment with --system-site-packages, so the image's torch, torchaudio, numpy,
#    sentencepiece and sacrebleu are used, and installs the bundle's wheels into it with --no-index --no-deps;
# 2. checks the corpus and the install, then runs the GPU suite (python -m pytest -q tests/gpu, SMOE_TEST_CORPUS set)
#    and benchmarks/speed.py on CUDA, each time-boxed;
# 3. writes RESULTS_DIR/summary.md (one page: versions, GPU, test counts, benchmark table) beside the raw logs.
# Exit status: 0 when the install worked and no test failed; 1 otherwise (the summary says what).
# Env: PYTHON (the image's interpreter, default python3), SMOE_NODE_VENV (default: <bundle>/venv),
#      TEST_TIMEOUT (s, default 300), BENCH_TIMEOUT (s, default 120), BENCH_ARGS (default "--repeats 3"),
#      PYTEST_ARGS (extra pytest arguments). Without CUDA the GPU tests skip and the benchmark runs a CPU smoke size.
set -uo pipefail
B=$(cd "$(dirname "$0")" && pwd)
R=${1:-${OUT:-$PWD/smoe_gpu_out}}
mkdir -p "$R" && R=$(cd "$R" && pwd)
want=$(sed -n 's/.*"python": *"\([0-9.]*\)".*/\1/p' "$B/BUNDLE_INFO.json" 2>/dev/null | head -1)
# the image's interpreter: $PYTHON, else the first of python3.X (the bundle's), python3, python that imports torch
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in "python$want" python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import sys, torch; sys.exit(0 if '%d.%d' % sys.version_info[:2] == '$want' else 1)" >/dev/null 2>&1; then
      PY=$c; break
    fi
  done
  PY=${PY:-python3}
fi
V=${SMOE_NODE_VENV:-$B/venv}
TEST_TIMEOUT=${TEST_TIMEOUT:-300}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-120}
LOG=$R/node.log
: > "$LOG"
T0=$(date +%s)
phase() { echo "[node] $*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - T0 )); }
status=0
declare -A secs rc

fail_early() {
  phase "FAILED: $*"
  echo "install_error=$*" > "$R/phases.env"
  "$PY" "$B/bundle_summary.py" --bundle "$B" --results "$R" --python "${VP:-$PY}" 2>>"$LOG" || true
  exit 1
}

[ -n "$want" ] || fail_early "$B/BUNDLE_INFO.json unreadable: is $B a bundle made by scripts/offline_bundle.sh?"
have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || fail_early "PYTHON=$PY does not run"
[ "$want" = "$have" ] || fail_early "the bundle was built for Python $want, $PY is $have (rebuild: NODE_PYTHON_VERSION=$have bash scripts/offline_bundle.sh)"
for m in torch torchaudio numpy sentencepiece sacrebleu; do
  "$PY" -c "import $m" 2>/dev/null || fail_early "the image's Python lacks $m (the bundle expects torch, torchaudio, numpy, sentencepiece, sacrebleu)"
done

# 1. environment
t=$(date +%s)
if [ ! -x "$V/bin/python" ]; then
  phase "venv $V (--system-site-packages, $PY $have)"
  "$PY" -m venv --system-site-packages "$V" >>"$LOG" 2>&1 \
    || { rm -rf "$V"; "$PY" -m venv --system-site-packages --without-pip "$V" >>"$LOG" 2>&1; } \
    || fail_early "python -m venv failed (see $LOG)"
fi
VP=$V/bin/python
# An image whose torch lives in a virtual environment of its own (python -m venv, uv, ...): --system-site-packages
# reaches only the base interpreter's packages, so its site folders are appended through a .pth file (after the
# bundle's, as system site-packages would be).
vsite=$("$VP" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
msg=$("$VP" - "$("$PY" -c 'import site; print("\n".join(site.getsitepackages()))')" "$vsite" <<'PYEOF'
import os, sys
img = [p for p in sys.argv[1].splitlines() if p and os.path.isdir(p)]
missing = [p for p in img if os.path.realpath(p) not in {os.path.realpath(q) for q in sys.path if q}]
pth = os.path.join(sys.argv[2], "smoe_image_site.pth")
if missing:
    with open(pth, "w") as f:
        f.write("\n".join(missing) + "\n")
    print("the image's packages are in a virtual environment: linked", " ".join(missing))
PYEOF
) || fail_early "reading the image's site folders failed"
[ -z "$msg" ] || phase "$msg"
if ! "$VP" -m pip --version >/dev/null 2>&1; then  # no ensurepip in the image: pip runs from its own wheel
  pipwhl=$(ls "$B"/wheels/pip-*.whl | head -1)
  "$VP" "$pipwhl/pip" install -q --no-index "$pipwhl" >>"$LOG" 2>&1 || fail_early "bootstrapping pip from $pipwhl failed"
fi
phase "install from $B/wheels (--no-index --no-deps)"
# PIP_CONFIG_FILE=/dev/null: a site pip.conf (index URLs, constraints) must not reach an offline install.
PIP_CONFIG_FILE=/dev/null "$VP" -m pip install -q --disable-pip-version-check --no-index --no-deps \
  --find-links "$B/wheels" -r "$B/requirements-node.txt" >>"$LOG" 2>&1 || fail_early "pip install from the bundle failed (see $LOG)"
PIP_CONFIG_FILE=/dev/null "$VP" -m pip install -q --disable-pip-version-check --no-index --no-deps --force-reinstall \
  --find-links "$B/wheels" fairseq_smoe >>"$LOG" 2>&1 || fail_early "installing the plugin wheel failed (see $LOG)"
# torch's console scripts (torchrun, which the GPU suite's two-process tests call beside fairseq-train) are in the
# image's bin folder, not the venv's: write the one the suite needs, the same entry point pip writes.
if [ ! -x "$V/bin/torchrun" ]; then
  printf '#!%s\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n' "$VP" > "$V/bin/torchrun"
  chmod +x "$V/bin/torchrun"
fi
site=$("$VP" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! "$VP" -c 'import sklearn, scipy' 2>/dev/null; then
  cp "$B/fairseq_optional_imports.py" "$site/smoe_fairseq_optional_imports.py"
  echo "import smoe_fairseq_optional_imports as m; m.install()" > "$site/smoe_fairseq_optional_imports.pth"
  phase "scikit-learn/scipy absent: fairseq's audio_classification task and sentence_prediction criteria disabled (fairseq_optional_imports.py)"
fi
"$VP" "$B/bundle_summary.py" --check-install >>"$LOG" 2>&1 || fail_early "the install is incomplete (see $LOG)"
secs[install]=$(( $(date +%s) - t ))
phase "installed in ${secs[install]} s"

# 2a. corpus moved with the bundle: every manifest row's audio must resolve and decode from here
t=$(date +%s)
: > "$R/corpus_check.log"
rc[corpus]=0
# two groups: dev and test share ids on purpose (the same held-out clips), which one call would flag as duplicates
for group in "train.tsv dev.tsv" "test_*.tsv"; do
  (cd "$B/corpus" && "$VP" -m fairseq_smoe.cli.validate $group --config config.yaml --check-audio) \
    >>"$R/corpus_check.log" 2>&1 || rc[corpus]=1
done
secs[corpus]=$(( $(date +%s) - t ))
[ "${rc[corpus]}" = 0 ] || { status=1; phase "corpus check FAILED (corpus_check.log)"; }

# 2b. GPU suite
t=$(date +%s)
phase "GPU suite: python -m pytest -q tests/gpu (time box ${TEST_TIMEOUT} s)"
mkdir -p "$R/gpu_results"
# SIGINT at the time box: pytest stops as on Ctrl-C and still writes its counts and JUnit report (timeout's group
# signal also reaches the fairseq processes a test started); SIGKILL 20 s later if that hangs.
(cd "$B/src" && SMOE_TEST_CORPUS="$B/corpus" SMOE_GPU_RESULTS="$R/gpu_results" timeout -s INT -k 20 "$TEST_TIMEOUT" \
  "$VP" -m pytest -q -p no:cacheprovider tests/gpu --junitxml="$R/gpu_tests.xml" -rfEs ${PYTEST_ARGS:-}) \
  >"$R/gpu_tests.log" 2>&1
rc[tests]=$?; secs[tests]=$(( $(date +%s) - t ))
tail -1 "$R/gpu_tests.log" | tee -a "$LOG"
case "${rc[tests]}" in 0|5) ;; *) status=1;; esac

# 2c. benchmark, one size at a time inside its time box (speed.py writes its table only when a run completes)
t=$(date +%s)
if "$VP" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  dev=cuda; sizes="xs s"; extra=${BENCH_ARGS:---repeats 3}
else  # CPU smoke run: the same pipeline, smallest settings
  dev=cpu; sizes="xs"; extra="--repeats 1 --measures forward --batch-size 2 --frames 200 --threads 1"
fi
rc[bench]=0; done_sizes=""
for s in $sizes; do
  left=$(( BENCH_TIMEOUT - ($(date +%s) - t) ))
  [ "$left" -ge 20 ] || { phase "benchmark: time box spent, size $s not run"; break; }
  phase "benchmark: speed.py --devices $dev --sizes $s $extra (${left} s left)"
  (cd "$B/src" && timeout -k 10 "$left" "$VP" benchmarks/speed.py --devices "$dev" --sizes "$s" $extra \
     --out "$R/speed_$s") >"$R/speed_$s.log" 2>&1
  r=$?
  if [ "$r" = 0 ]; then done_sizes="$done_sizes $s"
  elif [ "$r" = 124 ] || [ "$r" = 137 ]; then phase "benchmark size $s: time box reached"; break
  else rc[bench]=$r; status=1; phase "benchmark size $s FAILED (speed_$s.log)"; break; fi
done
secs[bench]=$(( $(date +%s) - t ))

cat > "$R/phases.env" <<EOT
install_seconds=${secs[install]}
corpus_rc=${rc[corpus]}
corpus_seconds=${secs[corpus]}
tests_rc=${rc[tests]}
tests_seconds=${secs[tests]}
test_timeout=$TEST_TIMEOUT
bench_rc=${rc[bench]}
bench_seconds=${secs[bench]}
bench_timeout=$BENCH_TIMEOUT
bench_device=$dev
bench_sizes=${done_sizes# }
total_seconds=$(elapsed)
EOT
"$VP" "$B/bundle_summary.py" --bundle "$B" --results "$R" --python "$VP" >>"$LOG" 2>&1 || status=1
phase "summary: $R/summary.md ($(elapsed) s in all, exit $status)"
exit $status
