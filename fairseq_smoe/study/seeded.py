"""The seeded study: every system from the same dense trunk, several seeds, paired statistics (issue 15).

    python -m fairseq_smoe.study.compare --data data/offline_study --out exp/study --preset study
    python -m fairseq_smoe.study.compare ... --seeds 3 --from-dense 2000      # the same flags spelled out

Why: one run per system trained from its own random start says nothing about a difference of a few WER points (a
second seed moved one demo cell by 16). Here each seed k trains one dense Base trunk for ``--from-dense`` updates,
upcycles it (:mod:`fairseq_smoe.cli.upcycle`, equal to the trunk at step 0 for every route) into every system and
continues each, Base included, for ``--max-update`` updates with seed k (the same data order: fairseq-train's
``--finetune-from-model`` restarts the data iterator, optimizer and learning-rate schedule for every system alike).
Seed k of two systems therefore differs only by what the experts learned after the shared start; the statistics
(:mod:`fairseq_smoe.study.report`) pair them by seed and by utterance.

Systems (:data:`STUDY_SYSTEMS`): the paper's four, ``s2t_dec_smoe+lang`` (DecS-MoE with one ST expert per target
language: decoder routes ``transcribe``, ``translate:es``, ``translate:de``, its own config yaml) and
``s2t_encdec_lmoe`` (the same experts with a learned switch gate instead of labels). ``--from-dense 0`` trains every
system from scratch with each seed instead.

Decoding: all test sets of a run are decoded by ONE fairseq-generate process over their rows concatenated (a
``study_<variant>.tsv`` in the run's view directory; joint CTC/attention on ASR rows, attention on ST rows, which the
task tells apart per row), and the log is split back into one fairseq-generate-format log per test set
(``<system>/decode_<variant>/<test set>.log``), which :mod:`fairseq_smoe.study.stats` reads. One process per
decoding instead of one per test set saves its start-up (about 5 s of the 5-8 s an _xs test set takes on a CPU).
Variants (section 3 of the issue; :mod:`fairseq_smoe.study.variants` writes their inputs): ``labels`` (the routes the
manifest says), ``wrong_encoder`` (every row's bandwidth label swapped; systems with encoder experts),
``spectral`` (every clip given at 16 kHz with no label, the route from spectral detection; systems with encoder
experts) and ``other_task_decoder`` (each decoder route runs the other task's expert; systems with decoder experts).
A system whose experts do not read a label is not decoded with that label wrong: its output cannot change.

Layout under ``--out``: ``view/`` (config yamls and manifests, audio from ``--data``), ``seed<k>/dense/``,
``seed<k>/<system>/`` (upcycled.pt, checkpoints, train.log, decode_<variant>/), ``results.json``, ``results.md``,
``results.png``. Reruns resume: finished trainings, averages and decodings are skipped.
"""

import concurrent.futures
import copy
import json
import logging
import math
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from ..routing import ST_TASK, RoutingTable, language_route, smoe_config
from . import compare

logger = logging.getLogger("compare")

# (name, system id): a system id is a registered arch (without size suffix), "+lang" = per-language ST routes
STUDY_SYSTEMS = [("Base", "s2t_smoe_base"), ("DecFFNx2", "s2t_dec_ffnx2"), ("DecS-MoE", "s2t_dec_smoe"),
                 ("EncDecS-MoE", "s2t_encdec_smoe"), ("DecS-MoE per language", "s2t_dec_smoe+lang"),
                 ("Learned gate", "s2t_encdec_lmoe")]
LANG_SUFFIX = "+lang"
LANG_CONFIG = "config_lang.yaml"
SPECTRAL_CONFIG = "config_spectral.yaml"
VARIANTS = ("labels", "wrong_encoder", "spectral", "other_task_decoder")
DENSE = "dense"
# a continued run starts its learning rate where the trunk's inverse-sqrt schedule ended, after this many warm-up
# updates (a restart at the peak rate would undo part of the trunk)
CONTINUE_WARMUP = 100


def system_arch(system: str) -> str:
    return system.split("+", 1)[0]


def system_dir(system: str) -> str:
    return system.replace("+", "_")


def arch_experts(arch: str) -> Dict[str, bool]:
    """Which labels an architecture's experts read: ``encoder`` (bandwidth) and ``decoder`` (task) for S-MoE
    experts; a learned gate reads neither (its architecture flags, from fairseq's registry)."""
    from argparse import Namespace

    from fairseq.models import ARCH_CONFIG_REGISTRY  # fairseq_smoe's import registered the architectures

    args = Namespace()
    ARCH_CONFIG_REGISTRY[arch](args)
    return {"encoder": bool(getattr(args, "encoder_smoe", False)), "decoder": bool(getattr(args, "decoder_smoe", False))}


def variants_of(system: str, size: str) -> List[str]:
    """The decodings of one system: the labels, plus each wrong-label variant its experts would notice."""
    experts = arch_experts(system_arch(system) + size)
    out = ["labels"]
    if experts["encoder"]:
        out += ["wrong_encoder", "spectral"]
    if experts["decoder"]:
        out.append("other_task_decoder")
    return out


# ---------------------------------------------------------------------------------------------------- the view


def st_languages(data: Path, train_subset: str) -> List[str]:
    """The ST target languages of the training manifests, sorted."""
    from ..data.manifest import read_manifest

    return sorted({row["tgt_lang"] for name in train_subset.split(",")
                   for row in read_manifest(str(data / f"{name}.tsv")) if row["task"] == ST_TASK})


def write_lang_config(view: Path, langs: List[str]) -> Path:
    """The view's config yaml with one decoder route per ST language (``translate:es``, ...)."""
    path = view / LANG_CONFIG
    cfg = yaml.safe_load((view / "config.yaml").read_text(encoding="utf-8"))
    smoe = cfg.get("smoe") or {}
    table = RoutingTable(**{k: smoe[k] for k in ("encoder_routes", "decoder_routes") if k in smoe})
    st_token = table.task_token(ST_TASK)
    decoder = [r for r in table.decoder_routes if r != st_token] + [language_route(st_token, x) for x in langs]
    cfg["smoe"] = dict(smoe, **smoe_config(table.encoder_routes, decoder))
    compare.write_atomic(path, yaml.safe_dump(cfg, sort_keys=False))
    return path


def decoder_routes_of(config: Path) -> Optional[List[str]]:
    smoe = yaml.safe_load(config.read_text(encoding="utf-8")).get("smoe") or {}
    return list(smoe["decoder_routes"]) if "decoder_routes" in smoe else None


def build_view(args, subsets: List[str]) -> Dict:
    """The run's view directory: config yamls, the train/dev manifests, and one manifest per decoding variant with
    every test set's rows (``index``: which rows belong to which test set)."""
    from . import variants

    view = args.out / "view"
    index_file = view / "index.json"
    if index_file.exists():
        index = json.loads(index_file.read_text())
        if index["subsets"] != subsets:
            raise SystemExit(f"{view} holds other test sets ({index['subsets']}); use another --out or delete it")
        return index
    view.mkdir(parents=True, exist_ok=True)
    variants.make_view(args.data, view)
    for name in {*args.train_subset.split(","), args.valid_subset}:
        shutil.copyfile(args.data / f"{name}.tsv", view / f"{name}.tsv")
    langs = st_languages(args.data, args.train_subset)
    write_lang_config(view, langs)
    rows, header, spans = [], None, []
    for subset in subsets:
        with open(args.data / f"{subset}.tsv", encoding="utf-8") as f:
            lines = f.read().splitlines()
        header = header or lines[0]
        if lines[0] != header:
            raise SystemExit(f"{args.data / subset}.tsv: its columns differ from the other test sets'")
        spans.append([subset, len(rows), len(rows) + len(lines) - 1])
        rows += lines[1:]
    labels = view / "study_labels.tsv"
    compare.write_atomic(labels, "\n".join([header, *rows]) + "\n")
    variants.swap_bandwidth(labels, view / "study_wrong_encoder.tsv")
    detected = variants.spectral_view(args.data, labels, view / "study_spectral.tsv", view / "audio_16k",
                                      config_in="config.yaml", config_out=view / SPECTRAL_CONFIG)
    index = {"subsets": subsets, "spans": spans, "st_languages": langs, "spectral_detection": detected}
    compare.write_atomic(index_file, json.dumps(index, indent=1) + "\n")
    return index


# ------------------------------------------------------------------------------------------------- one decoding


def split_log(log_text: str, spans: list, out_dir: Path, header: str) -> None:
    """One fairseq-generate-format log per test set from the log of their concatenation: each set's S/T/H/D/P
    lines, ids renumbered from 0 in manifest order, under a first line naming the set as ``--gen-subset``."""
    by_id: Dict[int, List[str]] = {}
    for line in log_text.splitlines():
        m = re.match(r"^([STHDP])-(\d+)\t", line)
        if m:
            by_id.setdefault(int(m.group(2)), []).append(line)
    for subset, start, end in spans:
        lines = [f"{header} --gen-subset {subset}"]
        for i in range(start, end):
            for line in by_id.get(i, []):
                kind, rest = line.split("-", 1)
                lines.append(f"{kind}-{i - start}\t{rest.split(chr(9), 1)[1]}")
        compare.write_atomic(out_dir / f"{subset}.log", "\n".join(lines) + "\n")


def score_log(path: Path, task: str) -> Dict:
    """A test set's score from its split log: WER (and CER) by the study's rules for ASR, sacreBLEU for ST
    (:func:`fairseq_smoe.study.stats.corpus_score`, the numbers the report's statistics start from)."""
    from . import stats

    metric = "wer" if compare.is_asr_task(task) else "bleu"
    utts = stats.utterance_scores(path, metric)
    result = {"metric": metric.upper(), "score": stats.corpus_score(utts, metric), "n": len(utts),
              "empty_hypotheses": sum(not u.hyp.strip() for u in utts)}
    if metric == "wer":
        result["cer"] = stats.corpus_score(stats.utterance_scores(path, "cer"), "cer")
    return result


def decode_variant(args, run: "Run", ckpt: Path, variant: str, index: Dict) -> Dict:
    """One fairseq-generate over every test set's rows (``variant``'s manifest, config and checkpoint), split and
    scored per test set; skipped when its result file exists."""
    out_dir = run.dir / f"decode_{variant}"
    result_file = out_dir / "results.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    view = args.out / "view"
    config = SPECTRAL_CONFIG if variant == "spectral" else run.config
    manifest = {"labels": "study_labels", "other_task_decoder": "study_labels",
                "wrong_encoder": "study_wrong_encoder", "spectral": "study_spectral"}[variant]
    if variant == "other_task_decoder":
        from . import variants

        rerouted = out_dir / "rerouted.pt"
        if not rerouted.exists():
            mapping = variants.reroute_decoder(ckpt, rerouted)
            compare.write_atomic(out_dir / "rerouted.json", json.dumps(mapping) + "\n")
        ckpt = rerouted
    # the printed score mixes ASR and ST rows: ignored, each test set is scored from its split log
    cmd = compare.generate_cmd(args, view, config, manifest, ckpt, ["--scoring", "sacrebleu"],
                               args.ctc_decode_weight if args.ctc_weight else 0.0)
    start = time.time()
    log = compare.run_logged(cmd, out_dir / f"{manifest}.log", args.threads)
    split_log(log, index["spans"], out_dir, " ".join(cmd[:cmd.index("--gen-subset")] + cmd[cmd.index("--path"):]))
    results = {"variant": variant, "decode_seconds": round(time.time() - start, 1), "tests": {}}
    for subset, s, e in index["spans"]:
        results["tests"][subset] = score_log(out_dir / f"{subset}.log", compare.parse_test(subset)[1])
        if results["tests"][subset]["n"] != e - s:
            raise SystemExit(f"{out_dir / subset}.log: {results['tests'][subset]['n']} utterances decoded of {e - s} "
                             f"(see {out_dir / manifest}.log)")
    compare.write_atomic(result_file, json.dumps(results, indent=1) + "\n")
    return results


# ------------------------------------------------------------------------------------------------- the runs


class Run:
    """One training: the dense trunk of a seed, or one system continued from it (or from scratch)."""

    def __init__(self, args, seed: int, system: Optional[str]):
        self.seed, self.system = seed, system
        self.dir = args.out / f"seed{seed}" / (system_dir(system) if system else DENSE)
        self.config = LANG_CONFIG if system and system.endswith(LANG_SUFFIX) else "config.yaml"
        self.name = f"seed {seed} {system or 'dense trunk'}"
        self.size = args.size

    def complete(self) -> bool:
        """Trained and (a system) decoded every way: a rerun skips it whole."""
        if not (self.dir / "DONE").exists():
            return False
        return self.system is None or all((self.dir / f"decode_{v}" / "results.json").exists()
                                          for v in variants_of(self.system, self.size))

    def train_args(self, args):
        a = copy.copy(args)
        a.data, a.seed, a.config_yaml = args.out / "view", self.seed, self.config
        if self.system is None:  # the trunk: the preset's schedule for --from-dense updates, its last checkpoint
            a.max_update, a.average_last = args.from_dense, 0
        elif args.from_dense:
            # continued: warm up briefly to the rate the trunk's inverse-sqrt schedule ended at
            a.warmup = min(CONTINUE_WARMUP, args.max_update)
            a.lr = round(args.lr * math.sqrt(min(1.0, args.warmup / args.from_dense)), 8)
            a.train_extra = ["--finetune-from-model", str(self.dir / "upcycled.pt"), *args.train_extra]
        return a


def upcycle(args, run: Run, trunk: Path) -> None:
    """The trunk upcycled into the run's system (skipped where it exists)."""
    out = run.dir / "upcycled.pt"
    if out.exists():
        return
    run.dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fairseq_smoe.cli.upcycle", "--dense", str(trunk),
           "--arch", system_arch(run.system) + args.size, "--out", str(out), "--data", str(args.out / "view"),
           "--config-yaml", run.config]
    compare.run_logged(cmd, run.dir / "upcycle.log", args.threads)


def run_system(args, run: Run, index: Dict) -> Dict:
    """Upcycle, continue, average the last checkpoints, decode every variant; the run's entry of results.json."""
    a = run.train_args(args)
    if args.from_dense:
        upcycle(args, run, args.out / f"seed{run.seed}" / DENSE / "checkpoint_last.pt")
    info = compare.train(a, system_arch(run.system), run.dir)
    if a.average_last:
        compare.average(a, run.dir, info.get("updates"))
    ckpt, _ = compare.decode_checkpoint(a, run.dir)
    decodes = {v: decode_variant(a, run, ckpt, v, index) for v in variants_of(run.system, args.size)}
    for v, d in decodes.items():
        logger.info(f"{run.name} {v}: " + ", ".join(f"{s} {t['metric']} {t['score']:.1f}" for s, t in d["tests"].items()))
    return {"train_seconds": info["train_seconds"], "updates": info.get("updates"), "last_loss": info.get("last_loss"),
            "decode_seconds": round(sum(d["decode_seconds"] for d in decodes.values()), 1),
            "averaged": compare.averaged_inputs(a, run.dir), "variants": decodes}


class Scheduler:
    """``--jobs`` workers over the runs in order: a seed's systems wait for its trunk, nothing else waits."""

    def __init__(self, trunks: List[Run], systems: List[Run]):
        self.pending = list(trunks) + list(systems)
        self.done_trunks, self.failed = set(), None
        self.cond = threading.Condition()

    def next(self) -> Optional[Run]:
        with self.cond:
            while True:
                if self.failed or not self.pending:
                    return None
                for i, run in enumerate(self.pending):
                    if run.system is None or run.seed in self.done_trunks:
                        return self.pending.pop(i)
                self.cond.wait()

    def finished(self, run: Run, error: Optional[BaseException] = None) -> None:
        with self.cond:
            if error is not None:
                self.failed = error
            elif run.system is None:
                self.done_trunks.add(run.seed)
            self.cond.notify_all()


def run(args, subsets: List[str]) -> None:
    """The seeded study: every seed's trunk and systems, then results.json/md/png (:mod:`fairseq_smoe.study.report`)."""
    from . import report

    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    index = build_view(args, subsets)
    chosen = [(name, sid) for name, sid in STUDY_SYSTEMS if sid in args.systems.split(",")]
    seeds = list(range(1, args.seeds + 1))
    trunks = [Run(args, s, None) for s in seeds] if args.from_dense else []
    runs = [Run(args, s, sid) for s in seeds for _, sid in chosen]
    missing = [r for r in trunks + runs if not r.complete()]
    sched = Scheduler(trunks, runs)
    entries: Dict = {}
    trunk_info: Dict = {}
    total, finished = len(trunks) + len(runs), []

    def worker():
        while True:
            r = sched.next()
            if r is None:
                return
            try:
                began = time.time()
                logger.info(f"{r.name}: started ({r.dir})")
                if r.system is None:
                    trunk_info[r.seed] = compare.train(r.train_args(args), "s2t_smoe_base", r.dir)
                else:
                    entries[(r.seed, r.system)] = run_system(args, r, index)
                finished.append(time.time() - began)
                left = total - len(finished)
                # projection: the runs left at the mean time of the finished ones, --jobs at a time
                eta = left * (sum(finished) / len(finished)) / args.jobs
                logger.info(f"{r.name}: done in {compare.hours(finished[-1])}; {len(finished)}/{total} runs done, "
                            f"{compare.hours(time.time() - start)} so far, about {compare.hours(eta)} left (projection)")
                sched.finished(r)
            except BaseException as e:
                sched.finished(r, e)
                raise

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(worker) for _ in range(args.jobs)]
        for f in futures:
            f.result()
    if sched.failed:
        raise sched.failed
    # the study's cost: the wall time of every invocation that trained or decoded something (a rerun that only
    # rebuilds the statistics adds nothing), kept across reruns in runs_time.json
    timing_file = args.out / "runs_time.json"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {"invocations": []}
    if missing:
        timing["invocations"].append({"seconds": round(time.time() - start, 1), "runs": len(missing),
                                      "jobs": args.jobs, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                   time.gmtime())})
        compare.write_atomic(timing_file, json.dumps(timing, indent=1) + "\n")
    if "table" not in args.steps:
        return
    stats_start = time.time()
    results = {
        "kind": "seeded study", "data": str(args.data), "preset": args.preset, "size": args.size,
        "seeds": seeds, "from_dense": args.from_dense, "max_update": args.max_update, "max_tokens": args.max_tokens,
        "lr": args.lr, "warmup": args.warmup, "continue_warmup": CONTINUE_WARMUP if args.from_dense else None,
        "ctc_weight": args.ctc_weight, "ctc_decode_weight": args.ctc_decode_weight, "beam": args.beam,
        "average_last": args.average_last, "save_every": args.save_every, "jobs": args.jobs,
        "device": "cpu" if args.cpu else "gpu", "precision": args.precision, "test_sets": subsets,
        "spectral_detection": index["spectral_detection"], "st_languages": index["st_languages"],
        "command": " ".join([Path(sys.executable).name, "-m", "fairseq_smoe.study.compare", *sys.argv[1:]]),
        "trunks": {str(s): {"train_seconds": i["train_seconds"], "updates": i.get("updates"),
                            "last_loss": i.get("last_loss")} for s, i in sorted(trunk_info.items())},
        "systems": {name: {"id": sid, "arch": system_arch(sid) + args.size,
                           "params": compare.parameter_counts(system_arch(sid) + args.size, args.data,
                                                              decoder_routes_of(args.out / "view" / Run(
                                                                  args, 1, sid).config)),
                           "seeds": {str(s): entries[(s, sid)] for s in seeds}} for name, sid in chosen},
        "constant_hypothesis": compare.constant_hypotheses(args.data, subsets, args.train_subset),
        "seconds_this_run": round(time.time() - start, 1),
    }
    results["statistics"] = report.statistics(results, args.out, jobs=args.jobs)
    results["timing"] = dict(timing, runs_wall_seconds=round(sum(i["seconds"] for i in timing["invocations"]), 1),
                             statistics_seconds=round(time.time() - stats_start, 1))
    compare.write_atomic(args.out / "results.json", json.dumps(results, indent=1) + "\n")
    print(report.write(results, args.out))
