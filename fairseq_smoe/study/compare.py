"""Train the paper's four systems on one data dir, decode every test set, and tabulate WER/BLEU.

    python -m fairseq_smoe.study.compare --data data/offline_quick --out exp/demo_quick --preset quick
    python -m fairseq_smoe.study.compare ... --steps train          # one stage of recipes/<corpus>/run.sh
    python -m fairseq_smoe.study.compare --tables-from exp/demo_quick/results.json --out DIR   # tables again

Systems (same data, same updates, same seed): Base (hard sharing), DecFFNx2, DecS-MoE, EncDecS-MoE. Each is
trained with ``fairseq-train`` and every test manifest (the offline corpus' ``test_<name>_<asr|st>_<nb|wb>.tsv``,
a public-corpus recipe's ``<split>_<asr|st>_<lang>_<nb|wb>.tsv``) is decoded with ``fairseq-generate`` in
subprocesses, exactly as a user would. ``--average-last K`` keeps the last K checkpoints and decodes their average
(:mod:`fairseq_smoe.cli.average_checkpoints`), as fairseq's S2T recipes do. ``--steps`` runs a part of the pipeline
(train, average, decode, table): the recipes' numbered stages call it one step at a time. Reruns resume: a finished
training, average or decoding is skipped, an interrupted training continues from checkpoint_last.pt. Writes
``results.json``, ``results.md`` and ``results.png`` into ``--out``; ``--tables-from`` rebuilds the last two from a
``results.json`` alone (the same code writes them in both cases). Next to each system's WER the table gives an
empty hypothesis' WER (100: every reference word deleted) and the best *constant* hypothesis' score
(:mod:`constant_baseline`: what a model that ignores the audio can reach with the text prior alone); a model listens
only where it beats both.
"""

import argparse
import concurrent.futures
import fnmatch
import json
import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Tuple

from ..cli.average_checkpoints import UPDATE_RE as UPDATE_CHECKPOINT_RE
from ..routing import ASR_TASK, BANDWIDTHS, ST_TASK, is_asr_task

PLUGIN = Path(__file__).resolve().parents[1]  # the fairseq_smoe package: --user-dir
REPO = PLUGIN.parent
SYSTEMS = [("Base", "s2t_smoe_base"), ("DecFFNx2", "s2t_dec_ffnx2"), ("DecS-MoE", "s2t_dec_smoe"),
           ("EncDecS-MoE", "s2t_encdec_smoe")]
STEPS = ("train", "average", "decode", "table")
_TASKS = f"{ASR_TASK}|{ST_TASK}"
_BWS = "|".join(BANDWIDTHS)
# test manifests: the offline corpus' test_<name>_<task>_<bw> and the public-corpus recipes' <split>_<task>_<lang>_<bw>
TEST_RE = re.compile(rf"^test(?:_(.*))?_({_TASKS})_({_BWS})$")
RECIPE_TEST_RE = re.compile(rf"^(.+?)_({_TASKS})_([^_]+)_({_BWS})$")
logger = logging.getLogger("compare")

# Settings per machine. quick: 2 CPU cores; two systems train at once, one thread each (an _xs model runs about
# as fast on one thread as on two, so this doubles the updates the half hour allows); many small updates (about
# 7 utterances each) and the auxiliary CTC loss on ASR rows, which measured better than fewer larger updates or no
# CTC (README, "Results of the quick mode"). full: a GPU, the _s size, the full offline corpus, one system at a time,
# in mixed precision ("auto": bf16 autocast where the GPU has bf16, else fp16) with enough data-loader workers
# ("auto": min(8, CPU cores)): on-the-fly fbank gives about 300 utterances/s per worker, and an _s update on an
# H100-class GPU takes about 0.1-0.2 s for about 120 utterances, so 4 workers or fewer would starve it.
PRESETS = {
    "quick": dict(size="_xs", max_update=4000, max_tokens=2000, lr=3e-3, warmup=500, validate_every=0, beam=3,
                  cpu=True, num_workers=0, jobs=2, ctc_weight=0.5, ctc_decode_weight=0.3, precision="fp32"),
    "full": dict(size="_s", max_update=40000, max_tokens=40000, lr=2e-3, warmup=4000, validate_every=2000,
                 beam=5, cpu=False, num_workers="auto", jobs=1, ctc_weight=0.3, ctc_decode_weight=0.3,
                 precision="auto"),
    # the seeded study (study/seeded.py, issue 15): per seed a dense Base trunk of --from-dense updates, upcycled into
    # every system, each continued for max_update updates; the quick settings otherwise; 2 CPU cores, jobs side by side
    "study": dict(size="_xs", max_update=1200, max_tokens=2000, lr=3e-3, warmup=500, validate_every=0, beam=3,
                  cpu=True, num_workers=0, jobs=2, ctc_weight=0.5, ctc_decode_weight=0.3, precision="fp32",
                  seeds=3, from_dense=2500, average_last=5, save_every=100, test_sets="test_digits_*,test_synth_*"),
    # CI: a few updates, to check the pipeline (CTC path included), not the models
    "smoke": dict(size="_xs", max_update=4, max_tokens=6000, lr=1e-3, warmup=2, validate_every=0, beam=1,
                  cpu=True, num_workers=0, jobs=1, ctc_weight=0.3, ctc_decode_weight=0.3, precision="fp32"),
}
# fairseq flags of each --precision. fairseq's own --bf16 means TPU: bf16 on a GPU is the task's --amp-dtype
# bfloat16 with fairseq's --amp (autocast, fp32 master weights)
PRECISION_FLAGS = {"fp32": [], "fp16": ["--fp16"], "amp": ["--amp"], "bf16": ["--amp", "--amp-dtype", "bfloat16"]}
MAX_AUTO_WORKERS = 8
PROGRESS_POLL_SECONDS = 30.0  # how often a running training's log is read for the time projection


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def resolve_precision(precision: str, cpu: bool, bf16_supported=None) -> str:
    """``auto``: fp32 on the CPU (and where torch sees no GPU: fairseq then trains on the CPU); on a GPU bf16 where it
    has bf16 (Ampere and later), else fp16.

    ``bf16_supported()``: True/False on a GPU, None without one; by default from ``torch.cuda`` (torch is imported
    only then)."""
    if precision != "auto":
        return precision
    if cpu:
        return "fp32"
    if bf16_supported is None:
        import torch

        def bf16_supported():  # bf16 hardware: torch's default also says yes for emulation (refused by the task)
            if not torch.cuda.is_available():
                return None
            try:
                return torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # torch without the argument
                return torch.cuda.is_bf16_supported()
    supported = bf16_supported()
    if supported is None:
        logger.warning("--precision auto: no CUDA device, so fp32 (fairseq will train on the CPU)")
        return "fp32"
    return "bf16" if supported else "fp16"


def resolve_num_workers(num_workers) -> int:
    """``auto``: min(8, CPU cores) data-loader workers."""
    if num_workers == "auto":
        return min(MAX_AUTO_WORKERS, os.cpu_count() or 1)
    return int(num_workers)


def project_train_time(log: str, max_update: int) -> Optional[dict]:
    """The training time of ``max_update`` updates projected from a running fairseq-train log.

    The time per update is measured between the first and the last ``train_inner`` line (fairseq's ``wall=``: seconds
    since the trainer started, validations included), so start-up and the first interval's warm-up do not count in
    it; the projection is the wall time so far plus the remaining updates at that rate. None until two log intervals
    were written."""
    points = [(int(u), float(w)) for u, w in
              re.findall(r"train_inner \|.*?\bnum_updates=(\d+),.*?\bwall=([\d.]+)", log)]
    if len(points) < 2:
        return None
    (u0, w0), (u1, w1) = points[0], points[-1]
    if u1 <= u0 or w1 <= w0:
        return None
    per_update = (w1 - w0) / (u1 - u0)
    return {"status": "projection", "max_update": max_update, "updates_done": u1,
            "measured_over_updates": [u0, u1], "seconds_per_update": round(per_update, 4),
            "projected_seconds": round(w1 + max(0, max_update - u1) * per_update, 1)}


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


class Progress:
    """``--out/progress.json`` while systems train: each system's time projection (until it is measured whole) and
    the whole run's, labelled ``projection``; results.json then holds the measured times."""

    def __init__(self, out: Path, arches: list, max_update: int, jobs: int = 1):
        self.path = out / "progress.json"
        self.arches = arches
        self.max_update = max_update
        self.jobs = max(1, min(jobs, len(arches)))  # systems trained at once (--jobs): wall time ~ total / jobs
        self.systems = {}
        self.lock = threading.Lock()

    def update(self, arch: str, entry: dict) -> None:
        with self.lock:
            self.systems[arch] = entry
            known = [e["seconds"] if e["status"] == "measured" else e["projected_seconds"]
                     for e in self.systems.values()]
            # systems not started yet: as long as the others (same size, same number of updates)
            total = sum(known) + (len(self.arches) - len(known)) * (sum(known) / len(known))
            measured = all(e["status"] == "measured" for e in self.systems.values()) and \
                len(self.systems) == len(self.arches)
            wall = total / self.jobs
            doc = {"status": "measured" if measured else "projection", "max_update": self.max_update,
                   "train_seconds_all_systems": round(total, 1), "jobs": self.jobs,
                   "wall_seconds_all_systems": round(wall, 1), "systems": self.systems,
                   "note": "training only (no decoding); a projection is the wall time so far plus the remaining "
                           "updates at the time per update measured so far"}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(doc, indent=2) + "\n")
        if entry["status"] == "projection":
            logger.info(f"{arch}: projected time for {entry['max_update']} updates: {hours(entry['projected_seconds'])} "
                        f"(projection: {entry['seconds_per_update']} s/update measured over updates "
                        f"{entry['measured_over_updates'][0]}-{entry['measured_over_updates'][1]}); all "
                        f"{len(self.arches)} systems: {hours(total)} of training"
                        + (f", about {hours(wall)} of wall time {self.jobs} at a time" if self.jobs > 1 else "")
                        + f" ({'measured' if measured else 'projection'})")


def run_logged(cmd, log_path: Path, threads: int = 0, on_progress=None, poll: Optional[float] = None) -> str:
    """Run ``cmd`` with its output in ``log_path`` (``threads``: the torch/OpenMP threads it may use, 0 = inherit;
    ``on_progress(text)``: called with the log so far every ``poll`` seconds, default
    :data:`PROGRESS_POLL_SECONDS`, while it runs)."""
    poll = PROGRESS_POLL_SECONDS if poll is None else poll
    logger.info(f"{Path(cmd[0]).name} ... (log: {log_path})")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    tmp = log_path.with_suffix(".part")
    with open(tmp, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    proc.wait(timeout=poll if on_progress else None)
                    break
                except subprocess.TimeoutExpired:
                    on_progress(tmp.read_text())
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    text = tmp.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}), see {tmp}:\n{text[-3000:]}")
    os.replace(tmp, log_path)
    return text


def is_learned_gate(arch: str) -> bool:
    """A learned-gate (switch) architecture of models/s2t_lmoe.py (its ARCH_TABLE names them)."""
    from ..models.s2t_lmoe import ARCH_TABLE as LMOE_ARCHES

    return arch in LMOE_ARCHES


def criterion_flags(ctc_weight: float, arch: str = "") -> list:
    """Label-smoothed cross-entropy, plus the auxiliary CTC loss on ASR rows when ``ctc_weight`` > 0; a learned-gate
    ``arch`` also gets the switch load-balancing loss (the criteria of :mod:`fairseq_smoe.criterions`)."""
    if is_learned_gate(arch):
        from ..models.s2t_lmoe import MOE_ASR_CTC_CRITERION, MOE_CRITERION

        if ctc_weight > 0:
            return ["--criterion", MOE_ASR_CTC_CRITERION, "--ctc-weight", str(ctc_weight)]
        return ["--criterion", MOE_CRITERION]
    if ctc_weight > 0:
        return ["--criterion", "label_smoothed_cross_entropy_asr_ctc", "--ctc-weight", str(ctc_weight)]
    return ["--criterion", "label_smoothed_cross_entropy"]


def checkpoint_flags(args) -> list:
    """When and which checkpoints fairseq-train writes and keeps.

    Validation (greedy decoding of dev) runs only every ``--validate-every`` updates and at the end: an untrained
    model decodes to the length limit, so validating every epoch would cost more than training in the quick preset.
    Without averaging, a checkpoint is saved at each validation and one is kept. With ``--average-last K`` one is
    saved every ``--save-every`` updates and the last K are kept; where validation runs only at the end, saving (and
    the validation fairseq runs at every mid-epoch save) starts only K-1 intervals before the end
    (``--validate-after-updates``), so the K checkpoints cost K dev decodings of a trained model and no more."""
    every = args.validate_every or args.max_update
    if not args.average_last:
        return ["--validate-interval-updates", str(every), "--save-interval-updates", str(every),
                "--keep-interval-updates", "1"]
    flags = ["--validate-interval-updates", str(every), "--save-interval-updates", str(args.save_every),
             "--keep-interval-updates", str(args.average_last)]
    if not args.validate_every:
        flags += ["--validate-after-updates", str(max(0, args.max_update - (args.average_last - 1) * args.save_every))]
    return flags


def config_yaml(args) -> str:
    """The data config of a run (fairseq's --config-yaml; a study system may train on its own routes)."""
    return getattr(args, "config_yaml", None) or "config.yaml"


def train_cmd(args, arch: str, save_dir: Path) -> list:
    cmd = [
        bin_path("fairseq-train"), str(args.data), "--user-dir", str(PLUGIN), "--config-yaml", config_yaml(args),
        "--task", "speech_to_text_smoe", "--arch", arch + args.size,
        "--train-subset", args.train_subset, "--valid-subset", args.valid_subset,
        *criterion_flags(args.ctc_weight, arch + args.size), "--label-smoothing", "0.1",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(args.lr),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(args.warmup), "--clip-norm", "10.0",
        "--max-tokens", str(args.max_tokens), "--max-update", str(args.max_update),
        "--seed", str(getattr(args, "seed", 1)),
        "--save-dir", str(save_dir), "--num-workers", str(args.num_workers),
        "--validate-interval", "1000000", "--save-interval", "1000000", *checkpoint_flags(args),
        "--no-epoch-checkpoints", "--best-checkpoint-metric", "wer",
        "--log-format", "simple", "--log-interval", "25", *PRECISION_FLAGS[args.precision], *args.train_extra,
    ]
    if args.cpu:
        cmd.append("--cpu")
    return cmd


def train(args, arch: str, save_dir: Path, progress: Optional[Progress] = None) -> dict:
    """Train one system (skipped when its DONE file says it was trained with the same command).

    While it trains, its log is read for the time projection (:func:`project_train_time`), logged and kept in
    ``progress``; once done, its measured time replaces the projection."""
    cmd = train_cmd(args, arch, save_dir)
    done = save_dir / "DONE"
    if done.exists():
        info = json.loads(done.read_text())
        if info.get("cmd") != cmd[1:]:
            raise SystemExit(f"{save_dir} holds a system trained with other settings:\n  {' '.join(info.get('cmd', []))}"
                             f"\nnow:\n  {' '.join(cmd[1:])}\nuse another --out or delete {save_dir}")
        logger.info(f"{arch}: trained already ({save_dir})")
        if progress:
            progress.update(arch, {"status": "measured", "seconds": info["train_seconds"]})
        return info
    if "train" not in args.steps:
        raise SystemExit(f"{save_dir}: not trained yet (no DONE file): run the train step first (--steps train)")
    save_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    last, first = {}, {}

    def on_progress(text):
        projection = project_train_time(text, args.max_update)
        if projection and projection["updates_done"] != last.get("updates_done"):
            last.update(projection)
            first.update(first or projection)
            if progress:
                progress.update(arch, projection)

    log = run_logged(cmd, save_dir / "train.log", args.threads, on_progress=on_progress)
    # per-interval losses, or (when training is shorter than one log interval) the epoch summaries'
    losses = [float(x) for x in re.findall(r"train_inner \| .*? loss=([\d.]+)", log)] or \
        [float(x) for x in re.findall(r"\| train \| epoch \d+ \| loss ([\d.]+)", log)]
    updates = [int(x) for x in re.findall(r"num_updates[= ](\d+)", log)]
    info = {"cmd": cmd[1:], "train_seconds": round(time.time() - start, 1),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "updates": max(updates) if updates else None}
    if first:  # the first projection made while it trained, kept next to the measured time
        info["time_projection"] = first
    if progress:
        progress.update(arch, {"status": "measured", "seconds": info["train_seconds"]})
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, done)
    return info


def generate_cmd(args, data: Path, config: str, subset: str, ckpt: Path, scoring: list,
                 ctc_decode_weight: float = 0.0) -> list:
    """The fairseq-generate command of one decoding (the demo's and the seeded study's): the run's beam, batch,
    length limits, workers, precision and device; joint CTC/attention with ``ctc_decode_weight``."""
    cmd = [
        bin_path("fairseq-generate"), str(data), "--user-dir", str(PLUGIN), "--config-yaml", config,
        "--task", "speech_to_text_smoe", "--gen-subset", subset, "--path", str(ckpt),
        "--max-tokens", str(max(args.max_tokens, 20000)), "--beam", str(args.beam), "--max-len-a", "0.1",
        "--max-len-b", "10", "--num-workers", str(args.num_workers), *scoring, *PRECISION_FLAGS[args.precision],
    ]
    if ctc_decode_weight:
        cmd += ["--ctc-decode-weight", str(ctc_decode_weight)]
    if args.cpu:
        cmd.append("--cpu")
    return cmd


def decode(args, ckpt: Path, subset: str, task: str, out_dir: Path, ctc_decode_weight: float = 0.0) -> dict:
    """fairseq-generate on one test set; with ``ctc_decode_weight`` joint CTC/attention beam search (files
    ``<subset>.joint.*``)."""
    stem = f"{subset}.joint" if ctc_decode_weight else subset
    result_file = out_dir / f"{stem}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    if result_file.exists():
        result = json.loads(result_file.read_text())
        if is_asr_task(task) and "cer" not in result:  # decoded before CER was reported: score the saved log
            result["cer"] = log_cer((out_dir / f"{stem}.log").read_text())
            write_atomic(result_file, json.dumps(result))
        return result
    if "decode" not in args.steps:
        raise SystemExit(f"{result_file}: not decoded yet: run the decode step first (--steps decode)")
    scoring = ["--scoring", "wer", "--wer-tokenizer", "13a", "--wer-lowercase", "--wer-remove-punct"] \
        if is_asr_task(task) else ["--scoring", "sacrebleu"]
    cmd = generate_cmd(args, args.data, config_yaml(args), subset, ckpt, scoring, ctc_decode_weight)
    start = time.time()
    log = run_logged(cmd, out_dir / f"{stem}.log", args.threads)
    if is_asr_task(task):
        m = re.search(r"WER: ([\d.]+)", log)
        result = {"metric": "WER", "score": float(m.group(1))}
    else:
        m = re.search(r"BLEU = ([\d.]+)", log)
        result = {"metric": "BLEU", "score": float(m.group(1))}
    refs = re.findall(r"^T-\d+\t(.*)$", log, re.M)
    hyps = re.findall(r"^D-\d+\t[^\t]*\t(.*)$", log, re.M)
    result.update(n=len(refs), decode_seconds=round(time.time() - start, 1),
                  empty_hypotheses=sum(not h.strip() for h in hyps))
    if is_asr_task(task):
        # an empty hypothesis deletes every reference word: 100 % WER whatever the reference
        result["empty_hyp_wer"] = 100.0 if any(r.split() for r in refs) else float("nan")
        result["cer"] = log_cer(log)
    write_atomic(result_file, json.dumps(result))
    return result


def log_cer(log: str) -> float:
    """Character error rate of a fairseq-generate log's detokenized hypotheses (D-) against its references (T-)."""
    from fairseq_smoe.scoring.evaluation import cer_stats, wer_from_sums

    refs = dict(re.findall(r"^T-(\d+)\t(.*)$", log, re.M))
    hyps = {k: h for k, _, h in re.findall(r"^D-(\d+)\t([^\t]*)\t(.*)$", log, re.M)}
    stats = cer_stats([hyps.get(k, "") for k in refs], list(refs.values()))
    return wer_from_sums(stats["_cer_errors"], stats["_cer_chars"])


def ctc_decode(args, ckpt: Path, subset: str, out_dir: Path) -> dict:
    """Greedy CTC decoding with the model's CTC head (:mod:`fairseq_smoe.study.ctc_greedy`): what the encoder hears."""
    result_file = out_dir / f"{subset}.ctc.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    if "decode" not in args.steps:
        raise SystemExit(f"{result_file}: not decoded yet: run the decode step first (--steps decode)")
    cmd = [sys.executable, "-m", "fairseq_smoe.study.ctc_greedy", "--path", str(ckpt),
           "--data", str(args.data), "--subset", subset, "--out", str(out_dir / f"{subset}.ctc.tsv")]
    if args.cpu:
        cmd.append("--cpu")
    log = run_logged(cmd, out_dir / f"{subset}.ctc.log", args.threads)
    result = json.loads(log.strip().splitlines()[-1])
    write_atomic(result_file, json.dumps(result))
    return result


def parameter_counts(arch: str, data: Path, decoder_routes: Optional[list] = None) -> dict:
    vocab = sum(1 for line in open(data / "spm.txt", encoding="utf-8") if line.strip()) + 4
    routes = ["--decoder-routes", ",".join(decoder_routes)] if decoder_routes else []
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.cli.params", "--arch", arch, "--vocab-size", str(vocab),
                           *routes], capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode != 0:
        return {}
    d = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {"total_M": round(d["total"] / 1e6, 2), "active_M": round(max(d["active"].values()) / 1e6, 2)}


def parse_test(subset: str) -> Optional[Tuple[str, str, str]]:
    """(name, task, bandwidth) of a test manifest's name, None if it is not one: ``test_real_es_st_nb`` (the offline
    corpus) gives ``("real_es", "st", "nb")``, ``tst-COMMON_st_de_wb`` (a public-corpus recipe's slice) gives
    ``("tst-COMMON_de", "st", "wb")``."""
    m = TEST_RE.match(subset)
    if m:
        return m.group(1) or "", m.group(2), m.group(3)
    m = RECIPE_TEST_RE.match(subset)
    if m:
        return f"{m.group(1)}_{m.group(3)}", m.group(2), m.group(4)
    return None


def column_label(subset: str) -> str:
    name, _, bw = parse_test(subset)
    return f"{name.replace('_', ' ')} {bw.upper()}".strip()


def column_order(subsets: list, task: str) -> list:
    cols = [s for s in subsets if parse_test(s)[1] == task]
    return sorted(cols, key=lambda s: (parse_test(s)[0], parse_test(s)[2]))


def plain_score(test: dict) -> float:
    return test["score"]


def joint_score(test: dict) -> Optional[float]:
    """The joint CTC/attention decoding's WER, None where the set was not decoded that way."""
    return test["joint"]["score"] if "joint" in test else None


def has_joint(results: dict, cols: list) -> bool:
    return bool(cols) and any(joint_score(r["tests"][c]) is not None for r in results["systems"].values() for c in cols)


def tables(results: dict, subsets: list) -> str:
    asr, st = column_order(subsets, ASR_TASK), column_order(subsets, ST_TASK)
    lines = score_table(results, asr, "ASR: WER % (lower is better)", "100.0", plain_score)
    w = results.get("ctc_decode_weight")
    if has_joint(results, asr):
        lines += score_table(results, asr, f"ASR: WER % with joint CTC/attention decoding (CTC weight {w}; lower is "
                                           f"better)", "100.0", joint_score)
    lines += score_table(results, st, "ST: BLEU (higher is better)", "0.0", plain_score)
    lines += cer_table(results, asr)
    return "\n".join(lines) + "\n"


def score_table(results: dict, cols: list, title: str, empty_score: str, pick) -> list:
    """Rows = systems (``pick`` reads a test result's score, None: not decoded that way), then the floors."""
    if not cols:
        return []
    lines = [f"\n### {title}\n",
             "| system | params total / active (M) | " + " | ".join(column_label(c) for c in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for name, _ in SYSTEMS:
        if name in results["systems"]:
            sysres = results["systems"][name]
            values = [pick(sysres["tests"][c]) for c in cols]
            if any(v is None for v in values):
                continue
            p = sysres.get("params", {})
            params = f"{p['total_M']} / {p['active_M']}" if p else ""
            lines.append(f"| {name} | {params} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    lines.append("| *empty hypothesis* | | " + " | ".join(empty_score for _ in cols) + " |")
    constant = results.get("constant_hypothesis", {})
    if constant:
        lines.append("| *best constant hypothesis* | | " + " | ".join(
            f"{constant[c]['score']:.1f}" if c in constant else "" for c in cols) + " |")
    any_sys = next(iter(results["systems"].values()), None)
    if any_sys:
        lines.append("| *utterances* | | " + " | ".join(str(any_sys["tests"][c]["n"]) for c in cols) + " |")
    return lines


def cer_table(results: dict, cols: list) -> list:
    """ASR character error rates: each system's decoder output and, when trained, its CTC head's greedy output."""
    if not cols:
        return []
    lines = ["\n### ASR: CER % (characters; decoder = fairseq-generate's output, CTC = the CTC head alone, greedy; "
             "joint = joint CTC/attention beam search)\n",
             "| system | output | " + " | ".join(column_label(c) for c in cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for name, _ in SYSTEMS:
        tests = results["systems"].get(name, {}).get("tests")
        if not tests:
            continue
        if all("cer" in tests[c] for c in cols):
            lines.append(f"| {name} | decoder | " + " | ".join(f"{tests[c]['cer']:.1f}" for c in cols) + " |")
        if all("ctc" in tests[c] for c in cols):
            lines.append(f"| {name} | CTC | " + " | ".join(f"{tests[c]['ctc']['cer']:.1f}" for c in cols) + " |")
        if all("joint" in tests[c] for c in cols):
            lines.append(f"| {name} | joint | " + " | ".join(f"{tests[c]['joint']['cer']:.1f}" for c in cols) + " |")
    lines.append("| *empty hypothesis* | | " + " | ".join("100.0" for _ in cols) + " |")
    constant = results.get("constant_hypothesis", {})
    if all("cer" in constant.get(c, {}) for c in cols):
        lines.append("| *best constant hypothesis* | | " + " | ".join(f"{constant[c]['cer']:.1f}" for c in cols) + " |")
    return lines


def constant_hypotheses(data: Path, subsets: list, train_subset: str = "train") -> dict:
    """Per test set, the best constant hypothesis drawn from the training targets (:mod:`constant_baseline`) of the
    ``train_subset`` manifests (comma-separated, as fairseq-train's ``--train-subset``)."""
    from . import constant_baseline

    train = [r for name in train_subset.split(",") for r in constant_baseline.read_manifest(str(data / f"{name}.tsv"))]
    return {s: constant_baseline.for_test_set(data, s, train) for s in subsets}


def chart(results: dict, subsets: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(ASR_TASK, plain_score, "ASR: WER % (lower is better)")]
    if has_joint(results, column_order(subsets, ASR_TASK)):
        panels.append((ASR_TASK, joint_score, "ASR: WER %, joint CTC/attention decoding"))
    panels.append((ST_TASK, plain_score, "ST: BLEU (higher is better)"))
    panels = [p for p in panels if column_order(subsets, p[0])]  # an ASR-only corpus (LibriSpeech) has no ST panel
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), squeeze=False)
    axes = axes[0]
    for ax, (task, pick, metric) in zip(axes, panels):
        cols = column_order(subsets, task)
        names = [n for n, _ in SYSTEMS if n in results["systems"]]
        width = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            vals = [pick(results["systems"][name]["tests"][c]) for c in cols]
            vals = [math.nan if v is None else v for v in vals]
            ax.bar([i + k * width for i in range(len(cols))], vals, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cols))])
        ax.set_xticklabels([column_label(c) for c in cols], rotation=20, fontsize=8)
        ax.set_title(metric)
        if is_asr_task(task):
            ax.axhline(100, color="grey", linestyle="--", linewidth=1, label="empty hypothesis")
        constant = results.get("constant_hypothesis", {})
        if any(c in constant for c in cols):
            xs = [i for i, c in enumerate(cols) if c in constant]
            ax.hlines([constant[cols[i]]["score"] for i in xs], [i - width / 2 for i in xs],
                      [i + 0.8 - width / 2 for i in xs], colors="black", linewidth=1.5,
                      label="best constant hypothesis")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=5, frameon=False)
    fig.suptitle(f"{results['data']}: {results['size']} models, {results['max_update']} updates each", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(".tmp." + path.name)
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    plt.close(fig)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(".tmp." + path.name)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def average_path(args, save_dir: Path) -> Path:
    return save_dir / f"checkpoint_avg{args.average_last}.pt"


def average_inputs(args, save_dir: Path, final_update: Optional[int]) -> list:
    """The newest ``--average-last`` checkpoints of a system, by update number, newest first.

    fairseq-train writes ``checkpoint_<epoch>_<update>.pt`` at a save interval inside an epoch only: where a save
    interval ends an epoch (always, when an epoch is one batch) it writes just ``checkpoint_last.pt``, so the final
    update's checkpoint may be ``checkpoint_last.pt``; it counts as the update training ended at."""
    files = {}
    for f in os.listdir(save_dir):
        m = UPDATE_CHECKPOINT_RE.fullmatch(f)
        if m:
            files[int(m.group(1))] = save_dir / f
    if final_update and final_update not in files and (save_dir / "checkpoint_last.pt").exists():
        files[final_update] = save_dir / "checkpoint_last.pt"
    return [files[u] for u in sorted(files, reverse=True)[:args.average_last]]


def average(args, save_dir: Path, final_update: Optional[int] = None) -> Path:
    """The average of the system's last ``--average-last`` checkpoints (:func:`average_inputs`;
    :mod:`fairseq_smoe.cli.average_checkpoints`), written once: skipped when it exists. Which checkpoints went in
    is kept next to it (``checkpoint_avg<K>.json``)."""
    out = average_path(args, save_dir)
    if out.exists():
        return out
    if "average" not in args.steps:
        raise SystemExit(f"{out}: not averaged yet: run the average step first (--steps average)")
    inputs = average_inputs(args, save_dir, final_update)
    if not inputs:
        raise SystemExit(f"{save_dir}: no checkpoints to average (train with --average-last {args.average_last})")
    if len(inputs) < args.average_last:
        logger.warning(f"{save_dir}: only {len(inputs)} of the last {args.average_last} checkpoints exist (fairseq "
                       f"writes none where a save interval ends an epoch); averaging those")
    cmd = [sys.executable, "-m", "fairseq_smoe.cli.average_checkpoints", "--inputs", *map(str, inputs),
           "--output", str(out)]
    run_logged(cmd, save_dir / f"checkpoint_avg{args.average_last}.log", args.threads)
    write_atomic(out.with_suffix(".json"), json.dumps({"inputs": [p.name for p in inputs]}) + "\n")
    return out


def averaged_inputs(args, save_dir: Path) -> Optional[list]:
    """The checkpoint names the average was made of (None without averaging)."""
    if not args.average_last:
        return None
    record = average_path(args, save_dir).with_suffix(".json")
    return json.loads(record.read_text())["inputs"] if record.exists() else None


def decode_checkpoint(args, save_dir: Path) -> Tuple[Path, Path]:
    """The checkpoint every test set is decoded with and the folder its results go to: the average of the last K
    checkpoints (``decode_avg<K>/``) with ``--average-last K``, else the best (``decode/``; the last where training
    never validated)."""
    if args.average_last:
        return average(args, save_dir), save_dir / f"decode_avg{args.average_last}"
    ckpt = save_dir / "checkpoint_best.pt"
    if not ckpt.exists():
        ckpt = save_dir / "checkpoint_last.pt"
    return ckpt, save_dir / "decode"


def run_system(args, name: str, arch: str, subsets: list, progress: Optional[Progress] = None) -> Optional[dict]:
    """The steps of one system: train it, average its last checkpoints, decode every test set with the result.

    Each step is skipped where its output exists (a training's DONE file, the averaged checkpoint, a test set's
    result file); a step not in ``--steps`` whose output is missing stops with a message naming the step to run.
    Returns the system's entry of results.json (None when no later step needs it)."""
    save_dir = args.out / arch
    info = train(args, arch, save_dir, progress)
    if not {"average", "decode", "table"} & args.steps:
        return None
    if args.average_last and "average" in args.steps:
        average(args, save_dir, info.get("updates"))
    if not {"decode", "table"} & args.steps:
        return None
    ckpt, out_dir = decode_checkpoint(args, save_dir)
    tests = {}
    for subset in subsets:
        task = parse_test(subset)[1]
        tests[subset] = decode(args, ckpt, subset, task, out_dir)
        logger.info(f"{name} {subset}: {tests[subset]['metric']} {tests[subset]['score']}")
        if is_asr_task(task) and args.ctc_weight:
            tests[subset]["ctc"] = ctc_decode(args, ckpt, subset, out_dir)
            logger.info(f"{name} {subset}: CTC greedy WER {tests[subset]['ctc']['wer']} CER {tests[subset]['ctc']['cer']}")
            if args.ctc_decode_weight:
                joint = decode(args, ckpt, subset, task, out_dir, args.ctc_decode_weight)
                tests[subset]["joint"] = dict(joint, ctc_decode_weight=args.ctc_decode_weight)
                logger.info(f"{name} {subset}: joint CTC/attention WER {joint['score']} CER {joint['cer']}")
    return {
        "arch": arch + args.size, "params": parameter_counts(arch + args.size, args.data),
        "train_seconds": info["train_seconds"], "updates": info.get("updates"),
        **({"train_time_projection": info["time_projection"]} if "time_projection" in info else {}),
        "first_loss": info.get("first_loss"), "last_loss": info.get("last_loss"),
        "decode_seconds": round(sum(t.get("decode_seconds", 0) for t in tests.values()), 1),
        **({"averaged": averaged_inputs(args, save_dir)} if args.average_last else {}), "tests": tests,
    }


def subsets_of(results: dict) -> list:
    """The test sets of a results.json: every set some system was decoded on."""
    return sorted({s for r in results["systems"].values() for s in r["tests"]})


def markdown(results: dict) -> str:
    """results.md, from results.json alone (what the run writes and what ``--tables-from`` rebuilds)."""
    # results.json written before it recorded the beam: its preset's (no preset set another one then)
    beam = results.get("beam", PRESETS.get(results.get("preset"), {}).get("beam"))
    ctc, k = results["ctc_weight"], results.get("average_last", 0)
    avg = f", the average of the last {k} checkpoints ({results['save_every']} updates apart)" if k else ""
    return (f"# S-MoE comparison on {Path(results['data']).name}\n\n{results['size']} models, "
            f"{results['max_update']} updates each (max {results['max_tokens']} frames per batch, lr {results['lr']}"
            f"{f', auxiliary CTC weight {ctc} on ASR rows' if ctc else ''}), same data and seed; "
            f"decoded with fairseq-generate, beam {beam}{avg}.\n" + tables(results, subsets_of(results)))


def write_tables(results: dict, out: Path) -> str:
    """results.md and results.png into ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(results)
    write_atomic(out / "results.md", md)
    chart(results, subsets_of(results), out / "results.png")
    return md


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="the data directory (required except with --tables-from)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tables-from", type=Path, metavar="RESULTS_JSON",
                   help="only write results.md and results.png into --out from this results.json (nothing is run)")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated steps to run, of {','.join(STEPS)} (default: all); a later step reads what "
                        f"an earlier one left in --out")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="defaults for the flags below")
    p.add_argument("--size", choices=["_xs", "_s", ""], help="architecture size suffix ('' = paper size)")
    p.add_argument("--max-update", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--validate-every", type=int, help="updates between dev decodings (0: only at the end)")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="train every system with seeds 1..N and report mean, std, 95 %% CI and paired tests "
                        "(fairseq_smoe.study.seeded; default 1: one run per system)")
    p.add_argument("--from-dense", type=int, metavar="UPDATES",
                   help="per seed: train one dense Base trunk for UPDATES updates, upcycle it into every system "
                        "(fairseq_smoe.cli.upcycle) and continue each, Base included, for --max-update updates on the "
                        "same data order (0: every system from scratch)")
    p.add_argument("--average-last", type=int, metavar="K",
                   help="keep the last K checkpoints (one every --save-every updates) and decode their average "
                        "(0: decode checkpoint_best.pt)")
    p.add_argument("--save-every", type=int, metavar="N",
                   help="with --average-last: updates between saved checkpoints (default: --validate-every, or "
                        "max_update / 40 where validation runs only at the end)")
    p.add_argument("--train-subset", default="train", help="training manifests, comma-separated (fairseq's)")
    p.add_argument("--valid-subset", default="dev", help="validation manifest (fairseq's)")
    p.add_argument("--ctc-weight", type=float, help="weight of the auxiliary CTC loss on ASR rows (0: none)")
    p.add_argument("--ctc-decode-weight", type=float,
                   help="also decode ASR sets with joint CTC/attention beam search, this CTC weight (0: do not; "
                        "only for systems trained with the CTC loss)")
    p.add_argument("--beam", type=int)
    p.add_argument("--num-workers", type=int, help="data-loader workers (full preset: min(8, CPU cores))")
    p.add_argument("--precision", choices=["auto", *PRECISION_FLAGS],
                   help="train and decode in this precision (auto: bf16 autocast on a GPU with bf16, else fp16; "
                        "fp32 on the CPU); full preset: auto, quick and smoke: fp32")
    p.add_argument("--cpu", action=argparse.BooleanOptionalAction, help="train and decode on the CPU")
    p.add_argument("--jobs", type=int, help="systems trained and decoded at the same time; on the CPU each gets "
                                            "1/jobs of the cores")
    p.add_argument("--systems", help="subset of the four, by arch (default all; with --seeds/--from-dense the study's "
                                     "six: the four, s2t_dec_smoe+lang and s2t_encdec_lmoe)")
    p.add_argument("--test-sets", help="comma-separated patterns of the test manifests to decode (default test_*)")
    p.add_argument("--train-extra", nargs=argparse.REMAINDER, default=[], help="more fairseq-train flags (last)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.tables_from is not None:
        return args
    if args.data is None:
        raise SystemExit("--data is required (except with --tables-from)")
    defaults = {**dict(seeds=1, from_dense=0, average_last=0, test_sets="test_*"), **PRESETS[args.preset]}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.seeds < 1:
        raise SystemExit(f"--seeds {args.seeds}: must be at least 1")
    if args.from_dense < 0:
        raise SystemExit(f"--from-dense {args.from_dense}: must be 0 (from scratch) or a number of updates")
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: must be at least 1")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise SystemExit(f"--steps {args.steps}: choose from {','.join(STEPS)}")
    args.steps = set(steps)
    if args.average_last < 0:
        raise SystemExit(f"--average-last {args.average_last}: must be 0 (no averaging) or more")
    if args.save_every is None:
        args.save_every = args.validate_every or max(1, args.max_update // 40)
    if args.average_last and args.save_every < 1:
        raise SystemExit(f"--save-every {args.save_every}: must be at least 1")
    if args.average_last and args.average_last * args.save_every > args.max_update:
        raise SystemExit(f"--average-last {args.average_last} --save-every {args.save_every}: training saves only "
                         f"{args.max_update // args.save_every} checkpoints in {args.max_update} updates")
    args.num_workers = resolve_num_workers(args.num_workers)
    args.precision = resolve_precision(args.precision, args.cpu)
    if args.cpu and args.precision == "fp16":
        raise SystemExit("--precision fp16 needs a GPU (fairseq's FP16 optimizer keeps its master copy on CUDA); "
                         "use --precision bf16 or fp32 with --cpu")
    # CPU jobs side by side share the cores instead of each spinning threads on all of them
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.cpu and args.jobs > 1 else 0
    args.seeded = args.seeds > 1 or args.from_dense > 0
    if args.seeded:
        from .seeded import STUDY_SYSTEMS as choices
    else:
        choices = SYSTEMS
    known = [a for _, a in choices]
    args.systems = args.systems or ",".join(known)
    unknown = set(args.systems.split(",")) - set(known)
    if unknown:
        raise SystemExit(f"--systems: unknown {sorted(unknown)}; choose from {known}"
                         + ("" if args.seeded else " (with --seeds/--from-dense also the study's extra systems)"))
    return args


def test_subsets(args) -> list:
    """The test manifests of ``--data`` that match ``--test-sets``."""
    subsets = sorted(f.stem for f in args.data.glob("*.tsv") if parse_test(f.stem)
                     and any(fnmatch.fnmatch(f.stem, pat) for pat in args.test_sets.split(",")))
    if not subsets:
        raise SystemExit(f"{args.data}: no test_<name>_<asr|st>_<nb|wb>.tsv or <split>_<asr|st>_<lang>_<nb|wb>.tsv "
                         f"manifests match {args.test_sets!r}")
    return subsets


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(message)s", level=logging.INFO)
    if args.tables_from is not None:
        if not args.tables_from.is_file():
            raise SystemExit(f"--tables-from {args.tables_from}: no such file")
        print(write_tables(json.loads(args.tables_from.read_text(encoding="utf-8")), args.out))
        return
    if not (args.data / "config.yaml").is_file():
        raise SystemExit(f"{args.data}: no config.yaml (prepare the data first, e.g. recipes/offline/prep.sh)")
    subsets = test_subsets(args)
    if args.seeded:
        from . import seeded

        seeded.run(args, subsets)
        return
    wanted = set(args.systems.split(","))
    results = {"data": str(args.data), "preset": args.preset, "size": args.size or "paper",
               "max_update": args.max_update, "max_tokens": args.max_tokens, "lr": args.lr,
               "ctc_weight": args.ctc_weight, "ctc_decode_weight": args.ctc_decode_weight, "device":
               "cpu" if args.cpu else "gpu", "precision": args.precision, "num_workers": args.num_workers,
               "jobs": args.jobs, "beam": args.beam,
               **({"average_last": args.average_last, "save_every": args.save_every} if args.average_last else {}),
               "systems": {}}
    start = time.time()
    chosen = [(name, arch) for name, arch in SYSTEMS if arch in wanted]
    progress = Progress(args.out, [arch for _, arch in chosen], args.max_update, args.jobs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_system, args, name, arch, subsets, progress) for name, arch in chosen]
        try:
            for (name, _), future in zip(chosen, futures):
                results["systems"][name] = future.result()
        except BaseException:
            for future in futures:  # a failed system stops the ones not started yet
                future.cancel()
            raise
    if "table" not in args.steps:
        logger.info(f"steps {','.join(s for s in STEPS if s in args.steps)} done ({args.out})")
        return
    results["seconds_this_run"] = round(time.time() - start, 1)
    # measured whole now: every system's training time, next to what was projected while it ran
    results["train_time"] = {"status": "measured", "train_seconds_all_systems": round(
        sum(r["train_seconds"] for r in results["systems"].values()), 1), "projected_seconds_all_systems": round(
        sum(r["train_time_projection"]["projected_seconds"] for r in results["systems"].values()), 1)
        if all("train_time_projection" in r for r in results["systems"].values()) else None}
    t = results["train_time"]
    logger.info(f"training time of the {len(results['systems'])} systems, measured: "
                f"{hours(t['train_seconds_all_systems'])}" + (f" (projected while they trained: "
                f"{hours(t['projected_seconds_all_systems'])})" if t["projected_seconds_all_systems"] else ""))
    results["constant_hypothesis"] = constant_hypotheses(args.data, subsets, args.train_subset)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    print(write_tables(results, args.out))


if __name__ == "__main__":
    main()
