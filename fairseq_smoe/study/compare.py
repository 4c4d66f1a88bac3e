"""Train the paper's four systems on one data dir, decode every test set, and tabulate WER/BLEU.

    python -m fairseq_smoe.study.compare --data data/offline_quick --out exp/demo_quick --preset quick

Systems (same data, same updates, same seed): Base (hard sharing), DecFFNx2, DecS-MoE, EncDecS-MoE. Each is
trained with ``fairseq-train`` and every ``test_<name>_<asr|st>_<nb|wb>.tsv`` is decoded with ``fairseq-generate``
in subprocesses, exactly as a user would. Reruns resume: a finished training or decoding is skipped, an interrupted
training continues from checkpoint_last.pt. Writes ``results.json``, ``results.md`` and ``results.png`` into
``--out``. Next to each system's WER the table gives an empty hypothesis' WER (100: every reference word deleted)
and the best *constant* hypothesis' score (:mod:`constant_baseline`: what a model that ignores the audio can reach
with the text prior alone); a model listens only where it beats both.
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
from typing import Optional

PLUGIN = Path(__file__).resolve().parents[1]  # the fairseq_smoe package: --user-dir
REPO = PLUGIN.parent
SYSTEMS = [("Base", "s2t_smoe_base"), ("DecFFNx2", "s2t_dec_ffnx2"), ("DecS-MoE", "s2t_dec_smoe"),
           ("EncDecS-MoE", "s2t_encdec_smoe")]
TEST_RE = re.compile(r"^test(?:_(.*))?_(asr|st)_(nb|wb)$")
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


def criterion_flags(ctc_weight: float) -> list:
    """Label-smoothed cross-entropy, plus the auxiliary CTC loss on ASR rows when ``ctc_weight`` > 0."""
    if ctc_weight > 0:
        return ["--criterion", "label_smoothed_cross_entropy_asr_ctc", "--ctc-weight", str(ctc_weight)]
    return ["--criterion", "label_smoothed_cross_entropy"]


def train_cmd(args, arch: str, save_dir: Path) -> list:
    # validate (greedy decoding of dev) only every --validate-every updates and at the end: an untrained model
    # decodes to the length limit, so validating every epoch would cost more than training in the quick preset
    every = args.validate_every or args.max_update
    cmd = [
        bin_path("fairseq-train"), str(args.data), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--arch", arch + args.size,
        "--train-subset", "train", "--valid-subset", "dev",
        *criterion_flags(args.ctc_weight), "--label-smoothing", "0.1",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(args.lr),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(args.warmup), "--clip-norm", "10.0",
        "--max-tokens", str(args.max_tokens), "--max-update", str(args.max_update), "--seed", "1",
        "--save-dir", str(save_dir), "--num-workers", str(args.num_workers),
        "--validate-interval", "1000000", "--save-interval", "1000000",
        "--validate-interval-updates", str(every), "--save-interval-updates", str(every),
        "--keep-interval-updates", "1", "--no-epoch-checkpoints", "--best-checkpoint-metric", "wer",
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


def decode(args, ckpt: Path, subset: str, task: str, out_dir: Path, ctc_decode_weight: float = 0.0) -> dict:
    """fairseq-generate on one test set; with ``ctc_decode_weight`` joint CTC/attention beam search (files
    ``<subset>.joint.*``)."""
    stem = f"{subset}.joint" if ctc_decode_weight else subset
    result_file = out_dir / f"{stem}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    if result_file.exists():
        result = json.loads(result_file.read_text())
        if task == "asr" and "cer" not in result:  # decoded before CER was reported: score the saved log
            result["cer"] = log_cer((out_dir / f"{stem}.log").read_text())
            write_atomic(result_file, json.dumps(result))
        return result
    scoring = ["--scoring", "wer", "--wer-tokenizer", "13a", "--wer-lowercase", "--wer-remove-punct"] \
        if task == "asr" else ["--scoring", "sacrebleu"]
    cmd = [
        bin_path("fairseq-generate"), str(args.data), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--gen-subset", subset, "--path", str(ckpt),
        "--max-tokens", str(max(args.max_tokens, 20000)), "--beam", str(args.beam), "--max-len-a", "0.1",
        "--max-len-b", "10", "--num-workers", str(args.num_workers), *scoring, *PRECISION_FLAGS[args.precision],
    ]
    if ctc_decode_weight:
        cmd += ["--ctc-decode-weight", str(ctc_decode_weight)]
    if args.cpu:
        cmd.append("--cpu")
    start = time.time()
    log = run_logged(cmd, out_dir / f"{stem}.log", args.threads)
    if task == "asr":
        m = re.search(r"WER: ([\d.]+)", log)
        result = {"metric": "WER", "score": float(m.group(1))}
    else:
        m = re.search(r"BLEU = ([\d.]+)", log)
        result = {"metric": "BLEU", "score": float(m.group(1))}
    refs = re.findall(r"^T-\d+\t(.*)$", log, re.M)
    hyps = re.findall(r"^D-\d+\t[^\t]*\t(.*)$", log, re.M)
    result.update(n=len(refs), decode_seconds=round(time.time() - start, 1),
                  empty_hypotheses=sum(not h.strip() for h in hyps))
    if task == "asr":
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
    cmd = [sys.executable, "-m", "fairseq_smoe.study.ctc_greedy", "--path", str(ckpt),
           "--data", str(args.data), "--subset", subset, "--out", str(out_dir / f"{subset}.ctc.tsv")]
    if args.cpu:
        cmd.append("--cpu")
    log = run_logged(cmd, out_dir / f"{subset}.ctc.log", args.threads)
    result = json.loads(log.strip().splitlines()[-1])
    write_atomic(result_file, json.dumps(result))
    return result


def parameter_counts(arch: str, data: Path) -> dict:
    vocab = sum(1 for line in open(data / "spm.txt", encoding="utf-8") if line.strip()) + 4
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.cli.params", "--arch", arch, "--vocab-size", str(vocab)],
                          capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode != 0:
        return {}
    d = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {"total_M": round(d["total"] / 1e6, 2), "active_M": round(max(d["active"].values()) / 1e6, 2)}


def column_label(subset: str) -> str:
    name, _, bw = TEST_RE.match(subset).groups()
    return f"{(name or '').replace('_', ' ')} {bw.upper()}".strip()


def column_order(subsets: list, task: str) -> list:
    cols = [s for s in subsets if TEST_RE.match(s).group(2) == task]
    return sorted(cols, key=lambda s: (TEST_RE.match(s).group(1) or "", TEST_RE.match(s).group(3)))


def plain_score(test: dict) -> float:
    return test["score"]


def joint_score(test: dict) -> Optional[float]:
    """The joint CTC/attention decoding's WER, None where the set was not decoded that way."""
    return test["joint"]["score"] if "joint" in test else None


def has_joint(results: dict, cols: list) -> bool:
    return bool(cols) and any(joint_score(r["tests"][c]) is not None for r in results["systems"].values() for c in cols)


def tables(results: dict, subsets: list) -> str:
    asr, st = column_order(subsets, "asr"), column_order(subsets, "st")
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


def constant_hypotheses(data: Path, subsets: list) -> dict:
    """Per test set, the best constant hypothesis drawn from the training targets (:mod:`constant_baseline`)."""
    from . import constant_baseline

    train = constant_baseline.read_manifest(str(data / "train.tsv"))
    return {s: constant_baseline.for_test_set(data, s, train) for s in subsets}


def chart(results: dict, subsets: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("asr", plain_score, "ASR: WER % (lower is better)")]
    if has_joint(results, column_order(subsets, "asr")):
        panels.append(("asr", joint_score, "ASR: WER %, joint CTC/attention decoding"))
    panels.append(("st", plain_score, "ST: BLEU (higher is better)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8))
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
        if task == "asr":
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


def run_system(args, name: str, arch: str, subsets: list, progress: Optional[Progress] = None) -> dict:
    """Train one system and decode every test set with it."""
    save_dir = args.out / arch
    info = train(args, arch, save_dir, progress)
    ckpt = save_dir / "checkpoint_best.pt"
    if not ckpt.exists():
        ckpt = save_dir / "checkpoint_last.pt"
    tests = {}
    for subset in subsets:
        task = TEST_RE.match(subset).group(2)
        tests[subset] = decode(args, ckpt, subset, task, save_dir / "decode")
        logger.info(f"{name} {subset}: {tests[subset]['metric']} {tests[subset]['score']}")
        if task == "asr" and args.ctc_weight:
            tests[subset]["ctc"] = ctc_decode(args, ckpt, subset, save_dir / "decode")
            logger.info(f"{name} {subset}: CTC greedy WER {tests[subset]['ctc']['wer']} CER {tests[subset]['ctc']['cer']}")
            if args.ctc_decode_weight:
                joint = decode(args, ckpt, subset, task, save_dir / "decode", args.ctc_decode_weight)
                tests[subset]["joint"] = dict(joint, ctc_decode_weight=args.ctc_decode_weight)
                logger.info(f"{name} {subset}: joint CTC/attention WER {joint['score']} CER {joint['cer']}")
    return {
        "arch": arch + args.size, "params": parameter_counts(arch + args.size, args.data),
        "train_seconds": info["train_seconds"], "updates": info.get("updates"),
        **({"train_time_projection": info["time_projection"]} if "time_projection" in info else {}),
        "first_loss": info.get("first_loss"), "last_loss": info.get("last_loss"),
        "decode_seconds": round(sum(t.get("decode_seconds", 0) for t in tests.values()), 1), "tests": tests,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="defaults for the flags below")
    p.add_argument("--size", choices=["_xs", "_s", ""], help="architecture size suffix ('' = paper size)")
    p.add_argument("--max-update", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--validate-every", type=int, help="updates between dev decodings (0: only at the end)")
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
    p.add_argument("--systems", default=",".join(a for _, a in SYSTEMS), help="subset of the four, by arch")
    p.add_argument("--test-sets", default="test_*", help="comma-separated patterns of the test manifests to decode")
    p.add_argument("--train-extra", nargs=argparse.REMAINDER, default=[], help="more fairseq-train flags (last)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: must be at least 1")
    args.num_workers = resolve_num_workers(args.num_workers)
    args.precision = resolve_precision(args.precision, args.cpu)
    if args.cpu and args.precision == "fp16":
        raise SystemExit("--precision fp16 needs a GPU (fairseq's FP16 optimizer keeps its master copy on CUDA); "
                         "use --precision bf16 or fp32 with --cpu")
    # CPU jobs side by side share the cores instead of each spinning threads on all of them
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.cpu and args.jobs > 1 else 0
    known = {a for _, a in SYSTEMS}
    unknown = set(args.systems.split(",")) - known
    if unknown:
        raise SystemExit(f"--systems: unknown {sorted(unknown)}; choose from {sorted(known)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(message)s", level=logging.INFO)
    if not (args.data / "config.yaml").is_file():
        raise SystemExit(f"{args.data}: no config.yaml (prepare the data first, e.g. recipes/offline/prep.sh)")
    subsets = sorted(f.stem for f in args.data.glob("test_*.tsv") if TEST_RE.match(f.stem)
                     and any(fnmatch.fnmatch(f.stem, pat) for pat in args.test_sets.split(",")))
    if not subsets:
        raise SystemExit(f"{args.data}: no test_<name>_<asr|st>_<nb|wb>.tsv manifests match {args.test_sets!r}")
    wanted = set(args.systems.split(","))
    results = {"data": str(args.data), "preset": args.preset, "size": args.size or "paper",
               "max_update": args.max_update, "max_tokens": args.max_tokens, "lr": args.lr,
               "ctc_weight": args.ctc_weight, "ctc_decode_weight": args.ctc_decode_weight, "device":
               "cpu" if args.cpu else "gpu", "precision": args.precision, "num_workers": args.num_workers,
               "jobs": args.jobs, "systems": {}}
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
    results["constant_hypothesis"] = constant_hypotheses(args.data, subsets)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    md = (f"# S-MoE comparison on {args.data.name}\n\n{results['size']} models, {args.max_update} updates each "
          f"(max {args.max_tokens} frames per batch, lr {args.lr}"
          f"{f', auxiliary CTC weight {args.ctc_weight} on ASR rows' if args.ctc_weight else ''}), same data and seed; "
          f"decoded with fairseq-generate, beam {args.beam}.\n" + tables(results, subsets))
    write_atomic(args.out / "results.md", md)
    chart(results, subsets, args.out / "results.png")
    print(md)


if __name__ == "__main__":
    main()
