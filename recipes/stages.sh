# Numbered stages shared by every recipes/<corpus>/run.sh (sourced, not run). ESPnet2/icefall style:
#   1 prepare data      recipes/<corpus>/prep.sh --out-dir DATA [prep options after --]
#   2 train             the paper's systems (Base, DecFFNx2, DecS-MoE, EncDecS-MoE; --systems), fairseq-train
#   3 average           the last K checkpoints of each system (--average K; python -m fairseq_smoe.cli.average_checkpoints)
#   4 decode            every test set with fairseq-generate: WER (ASR), BLEU (ST), joint CTC/attention where trained with CTC
#   5 score table       EXP/results.{md,json,png}
# Stages 2-5 are the steps of python -m fairseq_smoe.study.compare (--steps train|average|decode|table), called with
# the same settings each time. Every stage skips finished work (prep's own skip, a system's DONE file, the averaged
# checkpoint, each test set's result file) and an interrupted one resumes, so rerunning a recipe only does what is
# missing. Options (a run.sh may add its own, listed in its `options` array, before calling parse_options):
#   --stage N --stop-stage M   stages to run (default 1 to 5)
#   --data DIR --exp DIR       data directory (stage 1 writes it) and experiment directory
#   --systems A,B              archs of the systems (default all four: s2t_smoe_base,s2t_dec_ffnx2,s2t_dec_smoe,s2t_encdec_smoe)
#   --average K                decode the average of the last K checkpoints (fairseq's recipes: 10; 0: checkpoint_best.pt)
#   --save-every N             updates between the checkpoints kept for averaging (default: compare.py's)
#   --test-sets PATTERNS       comma-separated globs of the test manifests (the recipe's default: its test splits)
#   --train-subset, --valid-subset   manifests to train and validate on
#   --preset full|quick|smoke  compare.py's settings; default full: a GPU, mixed precision (auto: bf16 where the
#                              GPU has it, else fp16), min(8, cores) data-loader workers
#   --cpu                      train and decode on the CPU (the full preset without a GPU turns it on, with a warning)
#   --smoke                    CI size: --preset smoke --cpu (a few updates), --average 2 --save-every 1
#   --jobs N                   systems trained side by side
#   --compare-args "..."       more compare.py flags, e.g. "--max-update 100000 --size _s"
#   --dry-run                  print the commands instead of running them
#   -- ARGS                    passed to stage 1 (the corpus' prep.sh options: recipes/<corpus>/prep.sh --help)

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

stage=1
stop_stage=5
data=""
exp=""
systems="s2t_smoe_base,s2t_dec_ffnx2,s2t_dec_smoe,s2t_encdec_smoe"
average=10
save_every=""
test_sets=""
train_subset="train"
valid_subset="dev"
preset="full"
cpu=0
smoke=0
jobs=""
compare_args=""
dry_run=0
prep_args=()
common_options=(stage stop_stage data exp systems average save_every test_sets train_subset valid_subset preset
                jobs compare_args)
common_flags=(cpu smoke dry_run)

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  echo "common options: see recipes/stages.sh (--stage N --stop-stage M --data --exp --systems --average K" \
       "--preset --cpu --smoke --jobs --compare-args --dry-run -- PREP_ARGS)" >&2
}

# parse_options "$@": --name VALUE for every variable in common_options and the recipe's own `options`,
# --name for every flag in common_flags; everything after -- goes to stage 1.
parse_options() {
  local known=" ${common_options[*]} ${options[*]:-} " flags=" ${common_flags[*]} " name given=" "
  while [ $# -gt 0 ]; do
    case "$1" in
      --) shift; prep_args=("$@"); break ;;
      -h|--help) usage; exit 0 ;;
      --*)
        name="${1#--}"; name="${name//-/_}"
        if [[ "$flags" == *" $name "* ]]; then
          printf -v "$name" 1; shift
        elif [[ "$known" == *" $name "* ]]; then
          [ $# -ge 2 ] || { echo "$0: $1 needs a value" >&2; exit 2; }
          printf -v "$name" '%s' "$2"; given+="$name "; shift 2
        else
          echo "$0: unknown option $1 (prep options go after --; see $0 --help)" >&2; exit 2
        fi ;;
      *) echo "$0: unexpected argument $1 (prep options go after --)" >&2; exit 2 ;;
    esac
  done
  if [ "$smoke" = 1 ]; then  # CI size; options given explicitly win
    cpu=1
    for name in "preset smoke" "average 2" "save_every 1"; do
      set -- $name
      [[ "$given" == *" $1 "* ]] || printf -v "$1" '%s' "$2"
    done
  fi
  for name in stage stop_stage average; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || { echo "$0: --${name//_/-} ${!name}: not a number" >&2; exit 2; }
  done
}

log() { echo "[$recipe stage $1 $(date +%H:%M:%S)] ${*:2}"; }

run() {
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# the compare.py command shared by stages 2-5 (same settings each time: a changed one is refused by its DONE check)
compare_cmd() {
  cmp=("$py" -m fairseq_smoe.study.compare --data "$data" --out "$exp" --preset "$preset" --systems "$systems"
       --test-sets "$test_sets" --train-subset "$train_subset" --valid-subset "$valid_subset"
       --average-last "$average")
  [ -n "$save_every" ] && cmp+=(--save-every "$save_every")
  [ -n "$jobs" ] && cmp+=(--jobs "$jobs")
  if [ "$cpu" = 1 ]; then
    cmp+=(--cpu)
  elif [ "$preset" = full ] && [ "$dry_run" = 0 ] && \
       ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "[$recipe] --preset full wants a GPU; none found, training on the CPU (slow; --cpu says so)" >&2
    cmp+=(--cpu)
  fi
  # shellcheck disable=SC2206  # word-split on purpose: several flags in one option
  [ -n "$compare_args" ] && cmp+=($compare_args)
  return 0
}

# run_stages PREP_COMMAND...: stage 1 runs PREP_COMMAND (with the args after --), stages 2-5 compare.py's steps
run_stages() {
  [ -n "$data" ] && [ -n "$exp" ] || { echo "$0: --data and --exp are needed" >&2; exit 2; }
  if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
    log 1 "prepare data -> $data"
    run "$@" "${prep_args[@]}"
  fi
  [ "$stop_stage" -ge 2 ] || return 0
  if declare -F after_prep >/dev/null; then after_prep; fi  # a recipe's defaults that depend on the prepared data
  compare_cmd
  if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
    log 2 "train $systems -> $exp"
    run "${cmp[@]}" --steps train
  fi
  if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
    if [ "$average" -gt 0 ]; then
      log 3 "average the last $average checkpoints of each system"
      run "${cmp[@]}" --steps average
    else
      log 3 "--average 0: nothing to average, stage 4 decodes checkpoint_best.pt"
    fi
  fi
  if [ "$stage" -le 4 ] && [ "$stop_stage" -ge 4 ]; then
    log 4 "decode $test_sets"
    run "${cmp[@]}" --steps decode
  fi
  if [ "$stage" -le 5 ] && [ "$stop_stage" -ge 5 ]; then
    log 5 "score table -> $exp/results.md, $exp/results.json, $exp/results.png"
    run "${cmp[@]}" --steps table
  fi
}
