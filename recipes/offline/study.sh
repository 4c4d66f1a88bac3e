#!/usr/bin/env bash
# The seeded study of issue 15 on the offline corpus: 3 seeds, per seed one dense Base trunk upcycled into six
# systems (Base, DecFFNx2, DecS-MoE, EncDecS-MoE, DecS-MoE with one ST expert per language, the learned gate), each
# continued alike; every test set decoded with the labels and with wrong routes; paired statistics and verdicts.
#   recipes/offline/study.sh [--data DIR] [--exp DIR] [-- COMPARE_ARGS...]
# 1 builds the corpus (recipes/offline/prep.sh --mode study: the quick corpus with 300-string digit test sets),
# 2 runs python -m fairseq_smoe.study.compare --preset study (89 minutes measured on 2 CPU cores after the corpus;
# docs/results.md gives the measured time). Run recipes/offline/setup.sh once first. Reruns skip finished work.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
data="$repo/data/offline_study"
exp="$repo/exp/study"
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data="$2"; shift 2 ;;
    --exp) exp="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "$0: unknown option $1 (compare.py options go after --)" >&2; exit 2 ;;
  esac
done
echo "[study 1/2] corpus: $data"
bash "$repo/recipes/offline/prep.sh" --out-dir "$data" --mode study
echo "[study 2/2] seeded study: $exp"
exec "$py" -m fairseq_smoe.study.compare --data "$data" --out "$exp" --preset study "$@"
