"""The seeded study's statistics and tables (results.json -> results.md, results.png), from the split decode logs.

What it reports (issue 15, sections 2-4), every number with its noise:

- per system and test set (and per pooled group: ASR NB, ASR WB, ST NB, ST WB, every test set of a task pooled
  utterance by utterance): the score of each seed, mean, standard deviation and Student-t 95 % CI over seeds
  (:func:`fairseq_smoe.study.stats.seed_summary`);
- the contrasts (:data:`CONTRASTS`: each system vs Base, DecS-MoE vs DecFFNx2, EncDecS-MoE vs DecS-MoE on NB, the
  per-language experts vs DecS-MoE on ST, the learned gate vs EncDecS-MoE): the difference ``b - a``, its 95 % CI and
  p-value from the paired bootstrap over seeds and utterances (WER) or sacreBLEU's paired bootstrap (BLEU), and the
  minimum detectable effect at 80 % power (:mod:`fairseq_smoe.study.stats`);
- label robustness: each routed system decoded with a wrong label vs with the labels, the same paired test;
- the paper's claims and the three open questions, each with a verdict (confirmed / contradicted / not resolved at
  this power) from :func:`fairseq_smoe.study.stats.verdict`.

``python -m fairseq_smoe.study.report RESULTS_JSON --out DIR`` rewrites results.md and results.png from a
results.json (its ``statistics`` block holds every number; nothing is recomputed), as compare.py's --tables-from does
for the quick demo.
"""

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

from ..routing import ASR_TASK, BANDWIDTHS, ST_TASK, is_asr_task
from . import compare, stats

# (a, b, test-set filter): the difference is b - a; filters: "all", "nb"/"wb" (bandwidth), "st"/"asr" (task)
CONTRASTS = [
    ("Base", "DecFFNx2", "all"), ("Base", "DecS-MoE", "all"), ("Base", "EncDecS-MoE", "all"),
    ("Base", "DecS-MoE per language", "all"), ("Base", "Learned gate", "all"),
    ("DecFFNx2", "DecS-MoE", "all"), ("DecS-MoE", "EncDecS-MoE", "all"),
    ("DecS-MoE", "DecS-MoE per language", ST_TASK), ("EncDecS-MoE", "Learned gate", "all"),
]
VARIANT_LABELS = {"wrong_encoder": "wrong encoder route (bandwidth label swapped)",
                  "spectral": "encoder route from spectral detection (16 kHz input, no label)",
                  "other_task_decoder": "decoder routed to the other task's expert"}
N_RESAMPLES = 1000


def groups(subsets: List[str]) -> Dict[str, List[str]]:
    """Pooled groups of test sets: ``ASR NB``, ``ASR WB``, ``ST NB``, ``ST WB``, ``ASR``, ``ST`` (those not empty)."""
    out = {}
    for task, label in ((ASR_TASK, "ASR"), (ST_TASK, "ST")):
        for bw in BANDWIDTHS:
            sets = [s for s in subsets if compare.parse_test(s)[1] == task and compare.parse_test(s)[2] == bw]
            if sets:
                out[f"{label} {bw.upper()}"] = sets
        sets = [s for s in subsets if compare.parse_test(s)[1] == task]
        if sets:
            out[label] = sets
    return out


def _keep(subset: str, where: str) -> bool:
    _, task, bw = compare.parse_test(subset)
    return where == "all" or where in (task, bw)


def log_path(out: Path, system_id: str, seed, variant: str, subset: str) -> Path:
    return out / f"seed{seed}" / system_id.replace("+", "_") / f"decode_{variant}" / f"{subset}.log"


def _utterances(out: Path, system_id: str, seeds, variant: str, sets: List[str], metric: str,
                cache: Optional[Dict] = None) -> list:
    """Per seed, the pooled utterances of ``sets`` (ids offset so they stay unique and paired across systems);
    ``cache`` keeps each log's parse for the next contrast that reads it."""
    cache = {} if cache is None else cache
    per_seed = []
    for seed in seeds:
        pooled, offset = [], 0
        for subset in sets:
            key = (system_id, seed, variant, subset, metric)
            if key not in cache:
                cache[key] = stats.utterance_scores(log_path(out, system_id, seed, variant, subset), metric)
            utts = cache[key]
            pooled += [u._replace(id=u.id + offset) for u in utts]
            offset += len(utts)
        per_seed.append(pooled)
    return per_seed


def _paired(out, a_id, b_id, seeds, sets, metric, name_a, name_b, label, variant_a="labels", variant_b="labels",
            cache=None):
    ua = _utterances(out, a_id, seeds, variant_a, sets, metric, cache)
    ub = _utterances(out, b_id, seeds, variant_b, sets, metric, cache)
    if metric == "bleu":
        res = stats.paired_bleu([[u.hyp for u in s] for s in ua], [[u.hyp for u in s] for s in ub],
                                [u.ref for u in ua[0]], "bs", n_resamples=N_RESAMPLES, name_a=name_a, name_b=name_b,
                                test_set=label)
    else:
        res = stats.paired_bootstrap_wer(ua, ub, N_RESAMPLES, name_a=name_a, name_b=name_b, test_set=label)
    res.pop("bootstrap_deltas", None)
    res["ci95"] = list(res["ci95"])
    return res


def _direction(metric: str) -> str:
    return stats.LOWER if metric in ("wer", "cer") else stats.HIGHER


_LOGS: Dict = {}  # a statistics worker's parsed logs, kept for its next paired test


def _paired_task(call: tuple) -> Dict:
    return _paired(*call, cache=_LOGS)


def _run_paired(calls: List[tuple], jobs: int) -> List[Dict]:
    """Every paired test, in order; ``jobs`` > 1: that many worker processes (each test is independent and
    seeded, so the numbers do not depend on ``jobs``)."""
    if jobs <= 1:
        return [_paired_task(c) for c in calls]
    import concurrent.futures

    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_paired_task, calls, chunksize=4))


def statistics(results: Dict, out: Path, jobs: int = 1) -> Dict:
    """Every number of the report, from the split decode logs under ``out`` (``jobs``: processes for the paired
    tests, as many as trained side by side)."""
    seeds = results["seeds"]
    subsets = results["test_sets"]
    ids = {name: s["id"] for name, s in results["systems"].items()}
    pooled = groups(subsets)
    units = {s: [s] for s in subsets}
    units.update(pooled)
    cache: Dict = {}

    def metric_of(sets):
        return "wer" if is_asr_task(compare.parse_test(sets[0])[1]) else "bleu"

    summary = {}
    for name, sid in ids.items():
        summary[name] = {}
        for unit, sets in units.items():
            m = metric_of(sets)
            per_seed = [stats.corpus_score(u, m) for u in _utterances(out, sid, seeds, "labels", sets, m, cache)]
            summary[name][unit] = dict(stats.seed_summary(per_seed, f"{name} {unit}"), per_seed=per_seed,
                                       metric=m.upper())
    tasks = []  # (kind, extra, _paired's arguments): every paired test, run --jobs at a time
    for a, b, where in CONTRASTS:
        if a not in ids or b not in ids:
            continue
        for unit, sets in units.items():
            if all(_keep(s, where) for s in sets):
                tasks.append(("contrast", {}, (out, ids[a], ids[b], seeds, sets, metric_of(sets), a, b, unit)))
    for name, sid in ids.items():
        variants = sorted({v for s in results["systems"][name]["seeds"].values() for v in s["variants"]} - {"labels"})
        for variant in variants:
            for unit, sets in units.items():
                tasks.append(("robustness", {"system": name, "variant": variant},
                              (out, sid, sid, seeds, sets, metric_of(sets), f"{name} (labels)",
                               f"{name} ({variant})", unit, "labels", variant)))
    contrasts, robustness = [], []
    for (kind, extra, call), res in zip(tasks, _run_paired([t[2] for t in tasks], jobs)):
        m = call[5]
        res.update(extra)
        if kind == "contrast":
            res["verdict"] = stats.verdict_of(res, _direction(m))
            contrasts.append(res)
        else:  # the question is whether the wrong label hurts: "confirmed" = it does, significantly
            res["verdict"] = stats.verdict_of(res, stats.HIGHER if m == "wer" else stats.LOWER)
            robustness.append(res)
    return {"summary": summary, "groups": pooled, "contrasts": contrasts, "robustness": robustness,
            "claims": claims(summary, contrasts, robustness), "n_resamples": N_RESAMPLES}


def _find(contrasts, a, b, unit) -> Optional[Dict]:
    return next((c for c in contrasts if c["a"] == a and c["b"] == b and c["test_set"] == unit), None)


# (claim, a, b, pooled group, claimed relative change of a's score or None)
PAPER_CLAIMS = [
    ("EncDecS-MoE: -6.35 % relative WER on NB vs Base (hard sharing)", "Base", "EncDecS-MoE", "ASR NB", -0.0635),
    ("EncDecS-MoE better than DecS-MoE on NB (the encoder experts' own effect)", "DecS-MoE", "EncDecS-MoE", "ASR NB",
     None),
    ("DecS-MoE better than Base on ASR (paper: -8.06 % relative WER)", "Base", "DecS-MoE", "ASR", -0.0806),
    ("DecS-MoE better than Base on ST (paper: +1.77 % relative BLEU)", "Base", "DecS-MoE", "ST", 0.0177),
    ("DecS-MoE better than DecFFNx2 on ASR (same parameter count)", "DecFFNx2", "DecS-MoE", "ASR", None),
    ("DecS-MoE better than DecFFNx2 on ST (same parameter count)", "DecFFNx2", "DecS-MoE", "ST", None),
]
QUESTIONS = [
    ("Q1 more tasks: one ST expert per language better than one ST expert (ST)", "DecS-MoE", "DecS-MoE per language",
     "ST"),
    ("Q2 learned vs supervised routing: learned gate better than EncDecS-MoE (ASR)", "EncDecS-MoE", "Learned gate",
     "ASR"),
    ("Q2 learned vs supervised routing: learned gate better than EncDecS-MoE (ST)", "EncDecS-MoE", "Learned gate",
     "ST"),
]


def claims(summary, contrasts, robustness) -> List[Dict]:
    out = []
    for text, a, b, unit, rel in PAPER_CLAIMS + [q + (None,) for q in QUESTIONS]:
        c = _find(contrasts, a, b, unit)
        if c is None:
            continue
        direction = _direction(c["metric"].lower())
        claimed = rel * c["score_a"] if rel is not None else None
        if claimed is not None and claimed == 0:
            claimed = None
        out.append({"claim": text, "a": a, "b": b, "group": unit, "metric": c["metric"], "score_a": c["score_a"],
                    "score_b": c["score_b"], "delta": c["delta"], "ci95": c["ci95"], "p_value": c["p_value"],
                    "mde": c["mde"], "claimed_delta": claimed,
                    "verdict": stats.verdict(c["delta"], c["ci95"], c["mde"], direction, claimed)})
    for r in robustness:
        if r["test_set"] in ("ASR", "ST"):
            out.append({"claim": f"Q3 label robustness: {r['system']}, {VARIANT_LABELS[r['variant']]}, hurts "
                                 f"{r['test_set']}", "a": r["a"], "b": r["b"], "group": r["test_set"],
                        "metric": r["metric"], "score_a": r["score_a"], "score_b": r["score_b"], "delta": r["delta"],
                        "ci95": r["ci95"], "p_value": r["p_value"], "mde": r["mde"], "claimed_delta": None,
                        "verdict": r["verdict"]})
    return out


# ----------------------------------------------------------------------------------------------- Markdown, chart


def _ci(s: Dict) -> str:
    if s.get("ci95") is None:
        return f"{s['mean']:.1f}"
    return f"{s['mean']:.1f} ± {(s['ci95'][1] - s['ci95'][0]) / 2:.1f}"


def _signed(x: float) -> str:
    return f"{x:+.2f}"


def markdown(results: Dict) -> str:
    st = results["statistics"]
    seeds, names = results["seeds"], list(results["systems"])
    lines = [f"# Seeded S-MoE study on {Path(results['data']).name}", "",
             f"{len(seeds)} seeds; per seed one dense Base trunk of {results['from_dense']} updates, upcycled into "
             f"every system, each continued {results['max_update']} updates (same seed, same data order); "
             f"{results['size']} models, max {results['max_tokens']} frames per batch, auxiliary CTC weight "
             f"{results['ctc_weight']} on ASR rows; decoded with fairseq-generate (beam {results['beam']}, joint "
             f"CTC/attention weight {results['ctc_decode_weight']} on ASR rows) with the average of the last "
             f"{results['average_last']} checkpoints. Command: `{results['command']}`. {_measured(results)}",
             "", "Scores: mean ± half-width of the 95 % CI over seeds (Student t). Contrasts: difference b - a (WER "
             "points, lower is better; BLEU points, higher is better), 95 % CI and p from a paired bootstrap over "
             "seeds and utterances (BLEU: sacreBLEU's paired bootstrap p), MDE = smallest difference detectable at "
             "80 % power here.", ""]
    units = list(results["test_sets"]) + list(st["groups"])
    for label, task in (("ASR: WER %", ASR_TASK), ("ST: BLEU", ST_TASK)):
        cols = [u for u in units if (u in st["groups"] and u.startswith("ASR" if task == ASR_TASK else "ST"))
                or (u in results["test_sets"] and compare.parse_test(u)[1] == task)]
        if not cols:
            continue
        lines += [f"## {label} per system (mean ± 95 % CI over {len(seeds)} seeds)", "",
                  "| system | params total / active (M) | " + " | ".join(
                      compare.column_label(c) if c in results["test_sets"] else f"**{c} pooled**" for c in cols) + " |",
                  "|---|---|" + "---:|" * len(cols)]
        for name in names:
            p = results["systems"][name].get("params") or {}
            lines.append(f"| {name} | {p.get('total_M', '?')} / {p.get('active_M', '?')} | "
                         + " | ".join(_ci(st["summary"][name][c]) for c in cols) + " |")
        const = results.get("constant_hypothesis", {})
        key = "wer" if task == ASR_TASK else "bleu"
        lines.append("| *best constant hypothesis* | | " + " | ".join(
            f"{const[c][key]:.1f}" if c in const and key in const[c] else "" for c in cols) + " |")
        lines.append("| *utterances* | | " + " | ".join(
            str(sum(_n(results, s) for s in (st["groups"].get(c) or [c]))) for c in cols) + " |")
        lines.append("")
    lines += ["## Contrasts (pooled groups; every test set in results.json)", "",
              "| b vs a | group | a | b | b - a | 95 % CI | p | MDE | reading |", "|---|---|---:|---:|---:|---|---:|---:|---|"]
    for c in st["contrasts"]:
        if c["test_set"] in st["groups"]:
            lines.append(f"| {c['b']} vs {c['a']} | {c['test_set']} | {c['score_a']:.1f} | {c['score_b']:.1f} | "
                         f"{_signed(c['delta'])} | [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] | {c['p_value']:.3f} | "
                         f"{c['mde']:.2f} | {_reading(c)} |")
    lines += ["", "## Label robustness (the same system, labels vs a wrong route)", "",
              "| system | variant | group | labels | variant | change | 95 % CI | p | MDE |",
              "|---|---|---|---:|---:|---:|---|---:|---:|"]
    for r in st["robustness"]:
        if r["test_set"] in st["groups"]:
            lines.append(f"| {r['system']} | {r['variant']} | {r['test_set']} | {r['score_a']:.1f} | {r['score_b']:.1f} | "
                         f"{_signed(r['delta'])} | [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}] | {r['p_value']:.3f} | "
                         f"{r['mde']:.2f} |")
    det = results.get("spectral_detection") or {}
    if det.get("detected"):
        lines += ["", "Spectral detection on the 16 kHz copies (label -> detected route: rows): " + "; ".join(
            f"{lab}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for lab, d in det["detected"].items()) + "."]
    lines += ["", "Systems without routed experts on a side (Base, DecFFNx2; the learned gate, which reads no label) "
                  "are not decoded with that label wrong: their output cannot change.", "",
              "## Verdicts", "", "| claim / question | group | a | b | b - a [95 % CI] | MDE | claimed | verdict |",
              "|---|---|---:|---:|---|---:|---:|---|"]
    for c in st["claims"]:
        claimed = "" if c["claimed_delta"] is None else _signed(c["claimed_delta"])
        lines.append(f"| {c['claim']} | {c['group']} {c['metric']} | {c['score_a']:.1f} | {c['score_b']:.1f} | "
                     f"{_signed(c['delta'])} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] | {c['mde']:.2f} | {claimed} | "
                     f"**{c['verdict']}** |")
    lines += ["", _time_line(results), ""]
    return "\n".join(lines)


def _n(results: Dict, subset: str) -> int:
    first = next(iter(results["systems"].values()))
    seed = next(iter(first["seeds"].values()))
    return seed["variants"]["labels"]["tests"][subset]["n"]


def _reading(c: Dict) -> str:
    lo, hi = c["ci95"]
    if lo <= 0 <= hi:
        return "inside the noise"
    better = (hi < 0) if c["metric"] in ("WER", "CER") else (lo > 0)
    return f"{c['b']} {'better' if better else 'worse'}"


def _time_line(results: Dict) -> str:
    trunks = sum(t["train_seconds"] for t in results["trunks"].values())
    train = sum(s["train_seconds"] for r in results["systems"].values() for s in r["seeds"].values())
    dec = sum(s["decode_seconds"] for r in results["systems"].values() for s in r["seeds"].values())
    return (f"Time: training of the trunks {compare.hours(trunks)}, of the continued systems {compare.hours(train)}, "
            f"decoding {compare.hours(dec)} (summed over the jobs). {_measured(results)}")


def _measured(results: Dict) -> str:
    """The study's measured wall time (every invocation that trained or decoded) and its statistics step's."""
    t = results.get("timing") or {}
    if "runs_wall_seconds" not in t:
        return f"Measured: {compare.hours(results['seconds_this_run'])} wall in this invocation ({results['device']})."
    note = f" ({t['note']})" if t.get("note") else ""
    total = t["runs_wall_seconds"] + t["statistics_seconds"]
    return (f"Measured: {t['runs_wall_seconds'] / 60:.1f} min wall for training and decoding, {results['jobs']} "
            f"jobs side by side on {results['device']}{note}, after the corpus was built; the statistics "
            f"{t['statistics_seconds'] / 60:.1f} min; {total / 60:.1f} min in all.")


def chart(results: Dict, path: Path) -> None:
    """Bars of each system's pooled scores with 95 % CI error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = results["statistics"]
    panels = [(u, "WER % (lower is better)") for u in st["groups"] if u.startswith("ASR ")] + \
             [(u, "BLEU (higher is better)") for u in st["groups"] if u.startswith("ST ")]
    names = list(results["systems"])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    for ax, (unit, ylabel) in zip(axes[0], panels):
        means = [st["summary"][n][unit]["mean"] for n in names]
        errs = [0 if st["summary"][n][unit]["ci95"] is None else
                (st["summary"][n][unit]["ci95"][1] - st["summary"][n][unit]["ci95"][0]) / 2 for n in names]
        ax.bar(range(len(names)), means, yerr=errs, capsize=4, color=[f"C{i}" for i in range(len(names))])
        for i, n in enumerate(names):
            ax.scatter([i] * len(st["summary"][n][unit]["per_seed"]), st["summary"][n][unit]["per_seed"], s=10,
                       color="black", zorder=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{unit} pooled")
        ax.set_ylabel(ylabel)
    fig.suptitle(f"{len(results['seeds'])} seeds, mean and 95 % CI (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: Dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(results)
    compare.write_atomic(out / "results.md", md)
    chart(results, out / "results.png")
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description="results.md and results.png of a seeded study from its results.json")
    p.add_argument("results_json", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not args.results_json.is_file():
        raise SystemExit(f"{args.results_json}: no such file")
    print(write(json.loads(args.results_json.read_text(encoding="utf-8")), args.out))


if __name__ == "__main__":
    main()
