"""Real-time factor of the Python hub API: ``from_pretrained(...).transcribe(...)`` on the CPU, audio in, text out.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rtf.py --out benchmarks/results/rtf_cpu     # xs and s, ~3 min
    .venv/bin/python benchmarks/rtf.py --help

What is timed is the whole public call a user makes (``SMoEHubInterface.transcribe`` on a list of arrays): bandwidth
detection, resampling 8 kHz input to 16 kHz, fbank, the data config's CMVN, collating with guiding prefixes and route
ids, beam search (``SequenceGenerator`` through the task's ``inference_step``) and detokenisation. The models are
written here as ordinary checkpoints (random initialisation, ``--arch s2t_encdec_smoe_{xs,s}`` and the dense
``s2t_smoe_base_*`` for the ratio) with a data directory of their own (SentencePiece model, dictionary padded to
``--vocab`` entries, ``config.yaml``), and loaded by ``from_pretrained``, as a trained model would be. Random
weights give the same cost as trained ones once the hypothesis length is fixed: every hypothesis is forced to
``--tokens`` tokens (``min_len = max_len_b``), so every system and case does the same number of decoder steps.

Cases, each on the same ``--utts`` synthetic utterances of ``--seconds`` s:

* ``one-route``: every input 16 kHz (WB, one encoder route);
* ``mixed``: half the inputs 8 kHz (NB), interleaved with WB ones; the API batches by route pair
  (``smoe.homogeneous_batches: true``, the default), so a batch of 16 becomes two batches of 8;
* ``mixed-in-batch`` (batch sizes > 1 only): the same inputs with ``homogeneous_batches: false``, so NB and WB rows
  share a batch and the expert layers split it.

One call of the API decodes one task (the decoder route is the same for all its rows), so decoder-mixed batches
are not a case here. Batch size ``b`` is ``max_sentences=b`` on the whole list (batch size 1: one row per batch).

The systems of one size are loaded side by side; each case is called ``--repeats`` times, every repeat running
each system once, in an order rotated by one per repeat, so that the S-MoE / Base ratio is a median of ratios of
calls made back to back under the same machine load.

Speed is the issue's real-time factor, **audio seconds per processing second** (x real time: higher is faster);
the conventional RTF (processing / audio, lower is faster) is given next to it. Processing time is the process's
CPU time (``time.process_time``): on a shared machine the time this process waits for a core does not count; wall
time is reported too. Threads: ``--threads`` (default 1) for torch, and ``OMP_NUM_THREADS`` as set by the caller.
"""

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from fairseq import checkpoint_utils, options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from omegaconf import OmegaConf

import fairseq_smoe
from fairseq_smoe.data.vocab import build_vocab
from fairseq_smoe.hub import from_pretrained
from fairseq_smoe.prep.common import atomic_path, write_config

PLUGIN = Path(fairseq_smoe.__file__).resolve().parent
SYSTEMS = {"smoe": "s2t_encdec_smoe", "base": "s2t_smoe_base"}  # name: architecture prefix
SIZE_SUFFIX = {"xs": "_xs", "s": "_s"}
CASES = ("one-route", "mixed", "mixed-in-batch")
LANG = "en"
# --tiny (the smoke test): a few-kB model, so that the run checks the wiring, not the speed
TINY = ["--encoder-layers", "2", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2", "--conv-channels", "32"]
WORDS = ("one two three four five six seven eight nine zero press hold call back later menu option account "
         "balance transfer help operator yes no repeat thank you goodbye").split()


# ------------------------------------------------------------------------------------------------ model folder
def write_data_dir(out: Path, vocab: int) -> None:
    """SentencePiece model, dictionary (padded with placeholder words to ``vocab`` entries: the output layer's
    size, which is what costs) and ``config.yaml`` (utterance CMVN, default routes), as a recipe writes them."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=8)) for _ in range(400)]
    vocab_cfg = build_vocab(texts, str(out), [LANG], vocab_size=60)
    dict_path = out / vocab_cfg["vocab_filename"]
    lines = dict_path.read_text(encoding="utf-8").splitlines()
    missing = vocab - 4 - len(lines)  # fairseq adds its 4 specials itself
    if missing > 0:
        lines += [f"w{i} 1" for i in range(missing)]
        dict_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_config(out, vocab_cfg, specaugment=False)


def write_checkpoint(model_dir: Path, arch: str, tiny: bool, seed: int = 1) -> Path:
    """A checkpoint of ``arch``, randomly initialised, in the form fairseq-train writes (plain-type cfg, the
    plugin's signature in the state dict), built from fairseq-train's own command-line parser and the task."""
    argv = [str(model_dir), "--user-dir", str(PLUGIN), "--task", "speech_to_text_smoe", "--config-yaml",
            "config.yaml", "--arch", arch, "--criterion", "label_smoothed_cross_entropy", "--optimizer", "adam",
            "--lr", "1e-3", "--max-tokens", "20000", "--cpu", "--seed", str(seed), *(TINY if tiny else [])]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(seed)
    model = task.build_model(cfg.model)
    path = model_dir / f"{arch}.pt"
    checkpoint_utils.torch_persistent_save(
        {"args": None, "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
         "model": model.state_dict(),
         "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion", "optimizer_name": "Adam",
                                "lr_scheduler_state": {}, "num_updates": 0}],
         "extra_state": {"train_iterator": {"epoch": 1}}, "last_optimizer_state": None}, str(path))
    return path


def count_params(hub) -> int:
    return sum(p.numel() for p in hub.models[0].parameters())


# ------------------------------------------------------------------------------------------------------ inputs
def make_inputs(n: int, seconds: float, seed: int = 0) -> Dict[str, List]:
    """``(waveform, rate)`` inputs: all 16 kHz (one-route), or every other one 8 kHz (mixed)."""
    rng = np.random.default_rng(seed)

    def wav(rate):
        t = np.arange(int(seconds * rate)) / rate
        # a few tones plus noise: speech-like level, content irrelevant to the cost
        tone = sum(0.1 * np.sin(2 * np.pi * f * t) for f in rng.uniform(150, 3000, size=3))
        return (tone + 0.02 * rng.standard_normal(t.size)).astype(np.float32)

    wb = [(wav(16000), 16000) for _ in range(n)]
    mixed = [(wav(8000), 8000) if i % 2 == 0 else wb[i] for i in range(n)]
    return {"one-route": wb, "mixed": mixed, "mixed-in-batch": mixed}


# ------------------------------------------------------------------------------------------------------ timing
class BatchLog:
    """Counts the batches (and their route mix) the API hands to the task's ``inference_step``."""

    def __init__(self, task):
        self.task, self.original = task, task.inference_step
        self.batches: List[int] = []
        self.mixed = 0
        task.inference_step = self

    def __call__(self, generator, models, sample, **kw):
        self.batches.append(int(sample["id"].numel()))
        self.mixed += int(sample["net_input"]["route_plan"].encoder.min() != sample["net_input"]["route_plan"].encoder.max())
        return self.original(generator, models, sample, **kw)

    def reset(self):
        self.batches, self.mixed = [], 0


def run_case(hub, inputs, batch: int, case: str, cfg) -> Dict:
    """One API call on all inputs; CPU and wall seconds, the routes taken, the batches formed."""
    homogeneous = case != "mixed-in-batch"
    saved = hub.task.smoe_cfg
    hub.task.smoe_cfg = dataclasses.replace(saved, homogeneous_batches=homogeneous)
    log = hub.task.inference_step
    log.reset()
    try:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        out = hub.transcribe(inputs, lang=LANG, beam=cfg.beam, max_len_a=0, max_len_b=cfg.tokens,
                             max_sentences=batch, max_tokens=10 ** 9, segment=False)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        hub.task.smoe_cfg = saved
    lengths = sorted({len(t.tokens) for t in out})
    return {"cpu_s": cpu, "wall_s": wall, "bandwidths": sorted({t.bandwidth for t in out}),
            "hyp_tokens": lengths, "batches": list(log.batches), "mixed_batches": log.mixed}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def measure(cfg) -> Dict:
    """Every size: its systems loaded side by side, then every (batch, case) timed ``--repeats`` times, each
    repeat running every system once in an order rotated by one per repeat (paired under the same machine load)."""
    results = {"config": {k: v for k, v in vars(cfg).items() if k != "out"}, "runs": {}}
    inputs = make_inputs(cfg.utts, cfg.seconds)
    audio_s = cfg.utts * cfg.seconds
    plan = [(b, c) for b in cfg.batch_sizes for c in CASES if not (c == "mixed-in-batch" and b == 1)]
    with tempfile.TemporaryDirectory(prefix="smoe_rtf_") as tmp:
        model_dir = Path(tmp)
        write_data_dir(model_dir, cfg.vocab)
        for size in cfg.sizes:
            hubs, runs = {}, {}
            for system in cfg.systems:
                arch = SYSTEMS[system] + SIZE_SUFFIX[size]
                ckpt = write_checkpoint(model_dir, arch, cfg.tiny)
                hub = from_pretrained(model_dir, checkpoint_file=ckpt.name, lang=LANG)
                # every hypothesis exactly --tokens long: the same decoder steps for every system and case
                hub.cfg.generation.min_len = cfg.tokens
                BatchLog(hub.task)
                hubs[system] = hub
                runs[system] = {"arch": arch, "params": count_params(hub), "cases": {}}
                print(f"[rtf] {size} {system}: {arch}, {runs[system]['params'] / 1e6:.2f} M parameters",
                      file=sys.stderr, flush=True)
                # warm-up: one short call of each kind (first-call allocations, generator construction)
                for case in ("one-route", "mixed-in-batch"):
                    run_case(hub, inputs[case][:2], 2, case, cfg)
            names = list(hubs)
            for batch, case in plan:
                reps = {name: [] for name in names}
                for r in range(cfg.repeats):
                    for name in names[r % len(names):] + names[: r % len(names)]:
                        reps[name].append(run_case(hubs[name], inputs[case], batch, case, cfg))
                for name in names:
                    entry = _entry(reps[name], batch, case, audio_s)
                    runs[name]["cases"][f"b{batch} {case}"] = entry
                    print(f"[rtf] {size} {name} batch {batch} {case}: x{entry['x_realtime']:.1f} real time "
                          f"(RTF {entry['rtf']:.4f}), batches {entry['batches']}", file=sys.stderr, flush=True)
            for name in names:
                results["runs"][f"{size} {name}"] = runs[name]
            del hubs
    results["ratios"] = ratios(results["runs"])
    return results


def _entry(reps: List[Dict], batch: int, case: str, audio_s: float) -> Dict:
    cpu, wall = median([r["cpu_s"] for r in reps]), median([r["wall_s"] for r in reps])
    return {"batch": batch, "case": case, "audio_s": audio_s, "cpu_s": [r["cpu_s"] for r in reps],
            "wall_s": [r["wall_s"] for r in reps], "median_cpu_s": cpu, "median_wall_s": wall,
            "x_realtime": audio_s / cpu, "rtf": cpu / audio_s, "x_realtime_wall": audio_s / wall,
            **{k: reps[0][k] for k in ("bandwidths", "hyp_tokens", "batches", "mixed_batches")}}


def ratios(runs: Dict) -> List[Dict]:
    """Speed ratios: mixed / one-route and batch b / batch 1 (of the medians), and S-MoE / Base (same size, batch
    and case): the median of the per-repeat ratios, each repeat's two calls made back to back."""
    out = []
    for key, run in runs.items():
        cases = run["cases"]
        for name, e in cases.items():
            if e["case"] != "one-route":
                ref = cases[f"b{e['batch']} one-route"]
                out.append({"run": key, "what": f"b{e['batch']} {e['case']} / one-route",
                            "ratio": e["x_realtime"] / ref["x_realtime"]})
            if e["batch"] != 1 and f"b1 {e['case']}" in cases:
                out.append({"run": key, "what": f"{e['case']} b{e['batch']} / b1",
                            "ratio": e["x_realtime"] / cases[f"b1 {e['case']}"]["x_realtime"]})
        size, system = key.split()
        base = runs.get(f"{size} base")
        if system != "base" and base is not None:
            for name, e in cases.items():
                if name in base["cases"]:
                    paired = [b / s for s, b in zip(e["cpu_s"], base["cases"][name]["cpu_s"])]
                    out.append({"run": key, "what": f"{name}: {system} / base", "ratio": median(paired),
                                "per_repeat": paired})
    return out


# ------------------------------------------------------------------------------------------------------ report
def machine() -> Dict:
    def uptime():
        try:
            return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        except OSError:
            return "unknown"

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load": uptime()}


def report_md(results: Dict) -> str:
    c, m = results["config"], results["machine"]
    lines = [
        "# Hub API speed on the CPU: real-time factor of `transcribe`",
        "",
        f"{c['utts']} synthetic utterances of {c['seconds']} s ({c['utts'] * c['seconds']:.0f} s of audio) per "
        f"case, beam {c['beam']}, every hypothesis {c['tokens']} tokens, dictionary {c['vocab']} entries, "
        f"random-init weights{' (--tiny model)' if c['tiny'] else ''}; median of {c['repeats']} calls. "
        f"torch threads {m['torch_threads']}, OMP_NUM_THREADS={m['OMP_NUM_THREADS']}, {m['cpu_count']} CPUs; "
        f"torch {m['torch']}, Python {m['python']}.",
        f"Load before: `{m['load_before']}`; after: `{m['load_after']}`.",
        "",
        "**x real time** = audio seconds / processing (CPU) seconds, the issue's real-time factor (higher is "
        "faster); RTF = its inverse (lower is faster). `batches`: the batch sizes the API formed.",
        "",
        "| size | system | params | batch | case | x real time | RTF | x real time (wall) | batches |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, run in results["runs"].items():
        size, system = key.split()
        for e in run["cases"].values():
            batches = ",".join(str(b) for b in e["batches"]) if len(set(e["batches"])) > 1 else \
                f"{len(e['batches'])} x {e['batches'][0]}"
            lines.append(f"| {size} | {system} ({run['arch']}) | {run['params'] / 1e6:.2f} M | {e['batch']} | "
                         f"{e['case']} | **{e['x_realtime']:.1f}** | {e['rtf']:.4f} | {e['x_realtime_wall']:.1f} | "
                         f"{batches} |")
    lines += ["", "### Ratios (of x real time)", "",
              "mixed / one-route and b16 / b1: ratios of the medians; S-MoE / Base: median of the per-repeat ratios "
              "(the two systems called back to back).", "", "| run | ratio | value |", "|---|---|---|"]
    lines += [f"| {r['run']} | {r['what']} | x{r['ratio']:.3f} |" for r in results["ratios"]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="xs,s", help="model sizes (xs, s)")
    p.add_argument("--systems", default="smoe,base", help="smoe (s2t_encdec_smoe_*), base (s2t_smoe_base_*)")
    p.add_argument("--batch-sizes", default="1,16", help="rows per batch (max_sentences)")
    p.add_argument("--utts", type=int, default=16, help="utterances per case")
    p.add_argument("--seconds", type=float, default=4.0, help="duration of each utterance")
    p.add_argument("--tokens", type=int, default=16, help="hypothesis length (tokens, guiding prefix included)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--vocab", type=int, default=8000, help="dictionary entries (output layer size)")
    p.add_argument("--repeats", type=int, default=3, help="calls per case (median)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--tiny", action="store_true", help="a toy model (smoke test): figures mean nothing")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md (e.g. benchmarks/results/rtf_cpu)")
    cfg = p.parse_args(argv)
    cfg.sizes = [s for s in cfg.sizes.split(",") if s]
    cfg.systems = [s for s in cfg.systems.split(",") if s]
    cfg.batch_sizes = [int(b) for b in cfg.batch_sizes.split(",") if b]
    for name, values, known in (("--sizes", cfg.sizes, SIZE_SUFFIX), ("--systems", cfg.systems, SYSTEMS)):
        bad = [v for v in values if v not in known]
        if bad or not values:
            p.error(f"{name}: unknown or no value(s) {bad}; known: {sorted(known)}")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        p.error(f"--batch-sizes: positive integers, got {cfg.batch_sizes}")
    for name in ("utts", "tokens", "beam", "repeats", "threads"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name}: must be >= 1, got {getattr(cfg, name)}")
    if cfg.tokens < 3:
        p.error("--tokens: at least 3 (the two guiding tokens and one word)")
    if cfg.seconds <= 0.1:
        p.error(f"--seconds: must be > 0.1, got {cfg.seconds}")
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    # the dataset logs its size and OOV rate on every API call: once per measured call is noise here
    logging.getLogger("fairseq.data.audio.speech_to_text_dataset").setLevel(logging.WARNING)
    load_before = machine()["load"]
    start = time.perf_counter()
    results = measure(cfg)
    results["machine"] = {**machine(), "load_before": load_before}
    results["machine"]["load_after"] = results["machine"].pop("load")
    results["total_wall_s"] = round(time.perf_counter() - start, 1)
    md = report_md(results)
    print(md)
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(results, indent=1) + "\n")
        with atomic_path(out.with_suffix(".md")) as tmp:
            tmp.write_text(md)
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
