"""Train the paper's four systems on one data dir, decode every test set, and tabulate WER/BLEU.

    python examples/demo/compare.py --data data/offline_quick --out exp/demo_quick --size _xs --max-update 1500

Systems (same data, same updates, same seed): Base (hard sharing), DecFFNx2, DecS-MoE, EncDecS-MoE. Each is
trained with ``fairseq-train`` and decoded with ``fairseq-generate`` in subprocesses, exactly as a user would.
Reruns resume: a finished training or decoding is skipped, an interrupted one continues from checkpoint_last.pt.
Writes ``results.json``, ``results.md`` and ``results.png`` into ``--out``.
"""

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "fairseq_smoe"
SYSTEMS = [("Base", "s2t_smoe_base"), ("DecFFNx2", "s2t_dec_ffnx2"), ("DecS-MoE", "s2t_dec_smoe"),
           ("EncDecS-MoE", "s2t_encdec_smoe")]
TEST_RE = re.compile(r"^test(?:_(.*))?_(asr|st)_(nb|wb)$")
logger = logging.getLogger("compare")


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run_logged(cmd, log_path: Path) -> str:
    logger.info(" ".join(cmd[:3]) + f" ... (log: {log_path})")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    tmp = log_path.with_suffix(".part")
    with open(tmp, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    text = tmp.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}), see {tmp}:\n{text[-3000:]}")
    os.replace(tmp, log_path)
    return text


def train(args, arch: str, save_dir: Path) -> float:
    done = save_dir / "DONE"
    if done.exists():
        logger.info(f"{arch}: trained already ({save_dir})")
        return float(done.read_text() or 0)
    save_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    cmd = [
        bin_path("fairseq-train"), str(args.data), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--arch", arch + args.size,
        "--train-subset", "train", "--valid-subset", "dev",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(args.lr),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(args.warmup), "--clip-norm", "10.0",
        "--max-tokens", str(args.max_tokens), "--max-update", str(args.max_update), "--seed", "1",
        "--save-dir", str(save_dir), "--num-workers", str(args.num_workers),
        "--validate-interval-updates", str(args.validate_every), "--save-interval-updates", str(args.validate_every),
        "--keep-interval-updates", "1", "--no-epoch-checkpoints", "--best-checkpoint-metric", "wer",
        "--log-format", "simple", "--log-interval", "50", *args.train_extra,
    ]
    if args.cpu:
        cmd.append("--cpu")
    run_logged(cmd, save_dir / "train.log")
    seconds = time.time() - start
    done.write_text(f"{seconds:.1f}")
    return seconds


def decode(args, ckpt: Path, subset: str, task: str, out_dir: Path) -> dict:
    result_file = out_dir / f"{subset}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    if result_file.exists():
        return json.loads(result_file.read_text())
    scoring = ["--scoring", "wer", "--wer-tokenizer", "13a", "--wer-lowercase", "--wer-remove-punct"] \
        if task == "asr" else ["--scoring", "sacrebleu"]
    cmd = [
        bin_path("fairseq-generate"), str(args.data), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--gen-subset", subset, "--path", str(ckpt),
        "--max-tokens", str(args.max_tokens), "--beam", str(args.beam), "--max-len-a", "0", "--max-len-b", "100",
        "--num-workers", str(args.num_workers), *scoring,
    ]
    if args.cpu:
        cmd.append("--cpu")
    log = run_logged(cmd, out_dir / f"{subset}.log")
    if task == "asr":
        m = re.search(r"WER: ([\d.]+)", log)
        result = {"metric": "WER", "score": float(m.group(1))}
    else:
        m = re.search(r"BLEU = ([\d.]+)", log)
        result = {"metric": "BLEU", "score": float(m.group(1))}
    refs = re.findall(r"^T-\d+\t(.*)$", log, re.M)
    result["n"] = len(refs)
    if task == "asr":
        # an empty hypothesis deletes every reference word: the floor a model has to beat
        result["empty_hyp_wer"] = 100.0 if refs else float("nan")
    result_file.write_text(json.dumps(result))
    return result


def tables(results: dict, subsets: list) -> str:
    lines = []
    for metric, task in (("WER ↓", "asr"), ("BLEU ↑", "st")):
        cols = [s for s in subsets if TEST_RE.match(s).group(2) == task]
        if not cols:
            continue
        lines.append(f"\n### {metric} ({'ASR' if task == 'asr' else 'ST'})\n")
        lines.append("| system | " + " | ".join(c.replace("test_", "") for c in cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for name, _ in SYSTEMS:
            if name in results["systems"]:
                row = results["systems"][name]["tests"]
                lines.append(f"| {name} | " + " | ".join(f"{row[c]['score']:.2f}" for c in cols) + " |")
        if task == "asr":
            lines.append("| *empty hypothesis* | " + " | ".join("100.00" for _ in cols) + " |")
    return "\n".join(lines) + "\n"


def chart(results: dict, subsets: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, (task, metric) in zip(axes, (("asr", "WER (lower is better)"), ("st", "BLEU (higher is better)"))):
        cols = [s for s in subsets if TEST_RE.match(s).group(2) == task]
        names = [n for n, _ in SYSTEMS if n in results["systems"]]
        width = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            vals = [results["systems"][name]["tests"][c]["score"] for c in cols]
            ax.bar([i + k * width for i in range(len(cols))], vals, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cols))])
        ax.set_xticklabels([c.replace("test_", "") for c in cols], rotation=20, fontsize=8)
        ax.set_title(metric)
        if task == "asr":
            ax.axhline(100, color="grey", linestyle="--", linewidth=1, label="empty hypothesis")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", default="_xs", choices=["_xs", "_s", ""], help="architecture size suffix")
    p.add_argument("--max-update", type=int, default=1500)
    p.add_argument("--max-tokens", type=int, default=20000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--validate-every", type=int, default=500)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--cpu", action="store_true", help="train and decode on the CPU even if a GPU is present")
    p.add_argument("--systems", default=",".join(a for _, a in SYSTEMS), help="subset of the four, by arch")
    p.add_argument("--train-extra", nargs=argparse.REMAINDER, default=[], help="more fairseq-train flags (last)")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(message)s", level=logging.INFO)

    subsets = sorted(f.stem for f in args.data.glob("test_*.tsv") if TEST_RE.match(f.stem))
    if not subsets:
        raise SystemExit(f"{args.data}: no test_<name>_<asr|st>_<nb|wb>.tsv manifests")
    wanted = set(args.systems.split(","))
    results = {"data": str(args.data), "size": args.size or "paper", "max_update": args.max_update, "systems": {}}
    for name, arch in SYSTEMS:
        if arch not in wanted:
            continue
        save_dir = args.out / arch
        seconds = train(args, arch, save_dir)
        ckpt = save_dir / "checkpoint_best.pt"
        tests = {}
        for subset in subsets:
            tests[subset] = decode(args, ckpt, subset, TEST_RE.match(subset).group(2), save_dir / "decode")
            logger.info(f"{name} {subset}: {tests[subset]['metric']} {tests[subset]['score']}")
        results["systems"][name] = {"arch": arch + args.size, "train_seconds": seconds, "tests": tests}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    md = f"# S-MoE comparison on {args.data.name} ({results['size']} size, {args.max_update} updates)\n" + tables(results, subsets)
    (args.out / "results.md").write_text(md)
    chart(results, subsets, args.out / "results.png")
    print(md)


if __name__ == "__main__":
    main()
