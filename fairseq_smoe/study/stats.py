"""The study's statistics (issue 15, section 2): spread over seeds, paired significance on the same utterances, the
minimum detectable effect (MDE) and a verdict per claim.

Why: a single training run per system says nothing about the paper's claims here (a second seed moved one demo cell
by 16 WER points, more than any gap between the systems). Every comparison therefore reports its measured noise next
to its effect, and a claim is called confirmed or contradicted only where the 95 % interval of the effect says so.

What is computed, and from what:

- :func:`seed_summary`: mean, standard deviation and Student-t 95 % CI of one system's score over its seeds.
- :func:`utterance_scores`: per-utterance (id, hypothesis, reference, errors, words) from a fairseq-generate log as
  :mod:`fairseq_smoe.study.compare` keeps it (``<out>/<arch>/decode/<test set>.log``: the ``T-<id>`` reference and
  ``D-<id>`` detokenized hypothesis lines), scored with :mod:`fairseq_smoe.scoring.evaluation`'s WER/CER rules.
- :func:`paired_bootstrap_wer`: WER/CER difference of two systems, its 95 % CI and p-value, by a paired bootstrap
  over utterances and seeds (the same draws for both systems).
- :func:`paired_bleu`: BLEU difference, with the p-value (and per-system CI) of sacreBLEU's own paired bootstrap or
  approximate randomization test (:class:`sacrebleu.significance.PairedTest`), and a 95 % CI of the difference from
  the same paired bootstrap as WER, over sacreBLEU's per-segment statistics.
- :func:`mde` / :func:`mde_from_bootstrap`: the smallest true difference the comparison would detect with 80 % power.
- :func:`verdict`: "confirmed" / "contradicted" / "not resolved at this power" from the difference's CI and the MDE.
- :func:`paired_test_from_logs`: all of the above for one contrast, from the two systems' decode logs (per seed).

Differences are always ``b - a`` (``a`` the reference system of the contrast, e.g. Base), in the metric's own units:
WER/CER points (percent) or BLEU points.
"""

import contextlib
import math
import numbers
import os
import re
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from ..scoring import evaluation

CONFIDENCE = 0.95
LOWER, HIGHER = "lower", "higher"  # claim directions: the claim says b's score is lower / higher than a's
CONFIRMED, CONTRADICTED, NOT_RESOLVED = "confirmed", "contradicted", "not resolved at this power"
METRICS = ("wer", "cer", "bleu")
SACREBLEU_DEFAULT_SEED = 12345  # sacreBLEU's own default (its SACREBLEU_SEED environment variable)

_T_LINE = re.compile(r"^T-(\d+)\t(.*)$", re.M)
_D_LINE = re.compile(r"^D-(\d+)\t[^\t]*\t(.*)$", re.M)
_TRANSLATED = re.compile(r"Translated ([\d,]+) sentences")
_GEN_SUBSET = re.compile(r"--gen-subset[= ](\S+)")


class Utterance(NamedTuple):
    """One decoded utterance: ``errors`` word edits (WER) or character edits (CER) against ``words`` reference words
    (characters for CER); both None for BLEU, which is not a sum of per-utterance rates."""

    id: int
    hyp: str
    ref: str
    errors: Optional[int]
    words: Optional[int]


# --------------------------------------------------------------------------------------------------- over seeds


def _t_quantile(q: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


def _z_quantile(q: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(q)


def seed_summary(values: Sequence[float], label: str = "") -> Dict:
    """Mean, sample standard deviation (n - 1) and 95 % confidence interval of the mean over ``n`` seeds.

    The CI is Student's t: ``mean ± t(0.975, n - 1) · std / √n`` (few seeds: the normal quantile 1.96 would be too
    narrow; for 3 seeds t is 4.30). With one seed the spread is not measured: ``std`` and ``ci95`` are None (not 0,
    which would claim no noise) and ``note`` says so. ``label`` names the system and test set in errors."""
    where = f"{label}: " if label else ""
    try:
        x = np.asarray([float(v) for v in values], dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}seed_summary needs one number per seed, got {values!r} ({e})") from None
    if x.size == 0:
        raise ValueError(f"{where}seed_summary needs at least one seed's score, got none")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{where}seed_summary: non-finite score among the seeds {x.tolist()} (a failed decode?)")
    n, mean = int(x.size), float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None,
                "note": "one seed: the spread over seeds is not measured (std and CI need at least 2 seeds)"}
    std = float(x.std(ddof=1))
    half = _t_quantile(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": (mean - half, mean + half), "note": None}


# ------------------------------------------------------------------------------------------ decode logs -> scores


def log_test_set(text: str) -> Optional[str]:
    """The ``--gen-subset`` of a fairseq-generate log (compare.py writes the command as its first line), or None."""
    first = text.split("\n", 1)[0]
    m = _GEN_SUBSET.search(first)
    return m.group(1) if m else None


def utterance_scores(generate_log_path: Union[str, Path], metric: str) -> List[Utterance]:
    """Per-utterance scores of one fairseq-generate log, sorted by utterance id.

    Reads the ``T-<id>\\t<reference>`` and ``D-<id>\\t<score>\\t<hypothesis>`` lines (both detokenized; the ``H-``
    lines hold sentencepiece pieces), as :func:`fairseq_smoe.study.compare.log_cer` does. With ``--nbest`` > 1 the first
    ``D-`` line of an id (the best hypothesis) is kept. ``metric``: ``wer`` (word edits / reference words after
    :func:`fairseq_smoe.scoring.evaluation.normalize_for_wer`), ``cer`` (character edits / characters,
    :func:`~fairseq_smoe.scoring.evaluation.cer_stats`) or ``bleu`` (hypothesis and reference only). The ids are the
    test manifest's row order, so two systems' logs of one test set pair up by id.

    Raises ValueError naming the file for a log without references, an id decoded twice, a reference without a
    hypothesis (or the reverse), or a sentence count that differs from fairseq's own ``Translated N sentences``."""
    path = Path(generate_log_path)
    metric = str(metric).lower()
    if metric not in METRICS:
        raise ValueError(f"utterance_scores({path}): metric {metric!r}; choose from {', '.join(METRICS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such decode log (decode the test set first: compare.py --steps decode)")
    text = path.read_text(encoding="utf-8", errors="replace")
    refs: Dict[int, str] = {}
    for m in _T_LINE.finditer(text):
        i = int(m.group(1))
        if i in refs:
            raise ValueError(f"{path}: reference T-{i} appears twice (two decodings in one log?)")
        refs[i] = m.group(2)
    hyps: Dict[int, str] = {}
    for m in _D_LINE.finditer(text):
        hyps.setdefault(int(m.group(1)), m.group(2))
    if not refs:
        raise ValueError(f"{path}: no T-<id> reference lines: not a fairseq-generate log of a test set with targets")
    missing, extra = sorted(set(refs) - set(hyps)), sorted(set(hyps) - set(refs))
    if missing:
        raise ValueError(f"{path}: no D- hypothesis line for utterance id(s) {missing[:10]} (truncated log?)")
    if extra:
        raise ValueError(f"{path}: D- hypotheses without a T- reference for id(s) {extra[:10]}")
    m = _TRANSLATED.search(text)
    if m and int(m.group(1).replace(",", "")) != len(refs):
        raise ValueError(f"{path}: fairseq says it translated {m.group(1)} sentences but the log holds "
                         f"{len(refs)} T-/D- pairs")
    out = []
    for i in sorted(refs):
        hyp, ref = hyps[i], refs[i]
        if metric == "wer":
            s = evaluation.wer_stats([hyp], [ref])
            errors, words = s["_wer_errors"], s["_wer_words"]
        elif metric == "cer":
            s = evaluation.cer_stats([hyp], [ref])
            errors, words = s["_cer_errors"], s["_cer_chars"]
        else:
            errors = words = None
        out.append(Utterance(i, hyp, ref, errors, words))
    return out


def corpus_score(utts: Sequence[Utterance], metric: str) -> float:
    """The corpus score of parsed utterances: WER/CER in percent from the summed edits (as the paired bootstrap sums
    them), BLEU by sacreBLEU's corpus BLEU of the hypotheses."""
    if str(metric).lower() == "bleu":
        import sacrebleu

        return float(sacrebleu.corpus_bleu([u.hyp for u in utts], [[u.ref for u in utts]]).score)
    return 100.0 * sum(u.errors for u in utts) / max(1, sum(u.words for u in utts))


# ----------------------------------------------------------------------------------------- the paired bootstrap


def _where(name: str, test_set: Optional[str]) -> str:
    return f"{name} on {test_set}" if test_set else name


def _is_pair(x) -> bool:
    return (isinstance(x, (tuple, list, np.ndarray)) and len(x) == 2 and not isinstance(x, Utterance)
            and all(isinstance(v, numbers.Number) for v in x))


def _seeds_of(system, where: str) -> list:
    """A system's per-utterance records as a list of seeds (one seed: a list of Utterance or (errors, words))."""
    system = list(system)
    if not system:
        raise ValueError(f"{where}: no utterances")
    first = system[0]
    if isinstance(first, Utterance) or _is_pair(first):
        return [system]
    return [list(s) for s in system]


def _count_arrays(system, where: str) -> Tuple[list, Optional[list], np.ndarray, np.ndarray]:
    """(ids, refs or None, errors[S, n], words[S, n]) of one system; every seed must hold the same utterances."""
    seeds = _seeds_of(system, where)
    ids = refs = None
    errors, words = [], []
    for k, seed in enumerate(seeds):
        if not seed:
            raise ValueError(f"{where}: seed {k} has no utterances")
        if isinstance(seed[0], Utterance):
            if not all(isinstance(u, Utterance) for u in seed):
                raise ValueError(f"{where}: seed {k} mixes Utterance records and (errors, words) pairs")
            if any(u.errors is None or u.words is None for u in seed):
                raise ValueError(f"{where}: seed {k} has utterances without error counts (parsed for BLEU: "
                                 f"use utterance_scores(log, 'wer' or 'cer'))")
            k_ids, k_refs = [u.id for u in seed], [u.ref for u in seed]
            e, w = [u.errors for u in seed], [u.words for u in seed]
        else:
            if not all(_is_pair(p) for p in seed):
                raise ValueError(f"{where}: seed {k}: every utterance must be an (errors, words) pair of numbers")
            k_ids, k_refs = list(range(len(seed))), None
            e, w = [p[0] for p in seed], [p[1] for p in seed]
        e, w = np.asarray(e, dtype=float), np.asarray(w, dtype=float)
        if np.any(e < 0) or np.any(w < 0) or not (np.all(np.isfinite(e)) and np.all(np.isfinite(w))):
            raise ValueError(f"{where}: seed {k}: errors and words must be finite and >= 0")
        if k == 0:
            ids, refs = k_ids, k_refs
        else:
            if len(k_ids) != len(ids):
                raise ValueError(f"{where}: seed {k} has {len(k_ids)} utterances, seed 0 has {len(ids)} "
                                 f"(not the same test set?)")
            if k_ids != ids:
                raise ValueError(f"{where}: seed {k}'s utterance ids differ from seed 0's")
            if refs is not None and k_refs is not None and k_refs != refs:
                bad = next(i for i, (x, y) in enumerate(zip(refs, k_refs)) if x != y)
                raise ValueError(f"{where}: seed {k}'s reference of utterance {ids[bad]} differs from seed 0's")
            if not np.array_equal(w, words[0]):
                raise ValueError(f"{where}: seed {k}'s reference lengths differ from seed 0's (not the same "
                                 f"test set?)")
        errors.append(e)
        words.append(w)
    return ids, refs, np.stack(errors), np.stack(words)


def _check_paired(a: tuple, b: tuple, name_a: str, name_b: str, test_set: Optional[str]) -> None:
    (ids_a, refs_a, e_a, w_a), (ids_b, refs_b, e_b, w_b) = a, b
    on = f" on {test_set}" if test_set else ""
    if e_a.shape[1] != e_b.shape[1]:
        raise ValueError(f"{name_a} has {e_a.shape[1]} utterances{on}, {name_b} has {e_b.shape[1]}: a paired test "
                         f"needs both systems decoded on the same utterances")
    if e_a.shape[0] != e_b.shape[0]:
        raise ValueError(f"{name_a} has {e_a.shape[0]} seeds{on}, {name_b} has {e_b.shape[0]}: seeds are paired "
                         f"(seed k of both systems starts from the same dense trunk), so both need the same seeds")
    if ids_a != ids_b:
        bad = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y)
        raise ValueError(f"{name_a} and {name_b}{on}: utterance ids differ (position {bad}: {ids_a[bad]} vs "
                         f"{ids_b[bad]})")
    if refs_a is not None and refs_b is not None and refs_a != refs_b:
        bad = next(i for i, (x, y) in enumerate(zip(refs_a, refs_b)) if x != y)
        raise ValueError(f"{name_a} and {name_b}{on}: the reference of utterance {ids_a[bad]} differs "
                         f"({refs_a[bad]!r} vs {refs_b[bad]!r})")
    if not np.array_equal(w_a[0], w_b[0]):
        bad = int(np.flatnonzero(w_a[0] != w_b[0])[0])
        raise ValueError(f"{name_a} and {name_b}{on}: utterance {ids_a[bad]} has {w_a[0][bad]:g} reference "
                         f"words for one and {w_b[0][bad]:g} for the other (not the same test set?)")


def _resample_weights(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """How often each of ``n`` units is drawn in each of ``size`` resamples of ``n`` draws with replacement."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(float)


def _bootstrap(stats_a: np.ndarray, stats_b: np.ndarray, score: Callable[[np.ndarray], np.ndarray],
               n_resamples: int, seed: int, resample_seeds: bool) -> Tuple[float, float, np.ndarray]:
    """Full-data scores of a and b and ``n_resamples`` resampled differences ``b - a``.

    ``stats_*``: additive per-(seed, utterance) sufficient statistics, shape (S, n, k); ``score`` maps summed
    statistics (..., k) to a score. Each resample draws S seeds and then n utterances with replacement (the same
    draws for both systems and for every drawn seed) and scores the summed statistics of the drawn cells."""
    n_seeds, n_utt, _ = stats_a.shape
    rng = np.random.default_rng(seed)
    full_a = float(score(stats_a.sum(axis=(0, 1))))
    full_b = float(score(stats_b.sum(axis=(0, 1))))
    if resample_seeds and n_seeds > 1:
        w_seed = _resample_weights(rng, n_seeds, n_resamples)
    else:
        w_seed = np.ones((n_resamples, n_seeds))
    w_utt = _resample_weights(rng, n_utt, n_resamples)
    sums_a = np.einsum("bs,bu,suk->bk", w_seed, w_utt, stats_a, optimize=True)
    sums_b = np.einsum("bs,bu,suk->bk", w_seed, w_utt, stats_b, optimize=True)
    return full_a, full_b, np.asarray(score(sums_b), dtype=float) - np.asarray(score(sums_a), dtype=float)


def _summarise(deltas: np.ndarray, delta: float) -> Dict:
    """95 % percentile CI, two-sided p-value and standard error of the bootstrap differences."""
    deltas = deltas[np.isfinite(deltas)]
    b = deltas.size
    if b < 2:
        raise ValueError("fewer than 2 bootstrap resamples had a defined score (every drawn utterance without "
                         "reference words?)")
    lo, hi = np.percentile(deltas, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
    far = min(int(np.sum(deltas <= 0)), int(np.sum(deltas >= 0)))
    p = min(1.0, 2.0 * (far + 1) / (b + 1))
    se = float(deltas.std(ddof=1))
    return {"delta": delta, "ci95": (float(lo), float(hi)), "p_value": p, "delta_se": se,
            "mde": mde_from_bootstrap(deltas), "valid_resamples": int(b)}


def _rate(sums: np.ndarray) -> np.ndarray:
    """WER/CER in percent from summed (errors, words); NaN where no reference words were drawn."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sums[..., 1] > 0, 100.0 * sums[..., 0] / np.where(sums[..., 1] > 0, sums[..., 1], 1), np.nan)


def paired_bootstrap_wer(sys_a, sys_b, n_resamples: int = 1000, seed: int = 1, *, resample_seeds: bool = True,
                         name_a: str = "a", name_b: str = "b", test_set: Optional[str] = None, metric: str = "WER",
                         return_deltas: bool = False) -> Dict:
    """Paired bootstrap of the corpus WER (or CER) difference ``b - a``, in points.

    ``sys_a`` / ``sys_b``: per-utterance counts of one system on one test set, either one seed (a list of
    :class:`Utterance` from :func:`utterance_scores`, or of ``(errors, words)`` pairs) or a list of seeds (each such
    a list). Both systems need the same utterances (same ids and references, checked) and the same seeds, in the same
    order: seed k of every system is paired (in the study it starts from the same dense trunk and sees the same data
    order). Corpus WER = 100 · Σ errors / Σ words over every (seed, utterance) cell, which over seeds is the mean of
    the seeds' corpus WERs (each seed decodes the same references).

    **Seeds are resampled, not averaged.** Each of ``n_resamples`` resamples draws S seeds with replacement (when
    ``resample_seeds`` and S > 1) and n utterances with replacement, the same draws for both systems, and records the
    pooled WER of b minus that of a. Averaging the seeds per utterance first would drop the seed-to-seed variance,
    which dominated the demo's noise; resampling keeps it. With few seeds the seed level is coarse (3 seeds give 10
    distinct draws) and the bootstrap variance of a mean over S seeds is (S - 1)/S of the usual estimate: with 3
    seeds the seed part of the variance is understated by a third (its standard error by about 18 %), stated here
    rather than corrected. ``per_seed_delta`` and ``mde_seeds`` (the MDE
    from the spread of the per-seed differences, Student t) report the seed level on its own.

    Returns ``score_a``, ``score_b``, ``delta`` (full data), ``ci95`` (2.5th and 97.5th percentiles of the resampled
    differences), ``p_value`` (two-sided: twice the share of resampled differences on the far side of zero, with the
    +1 correction of Davison & Hinkley (1997) so a finite bootstrap never says p = 0; identical systems give 1, a
    system better on every utterance about 2 / (n_resamples + 1)), ``delta_se`` (standard deviation of the resampled
    differences), ``mde`` (:func:`mde_from_bootstrap`), the per-seed differences and the settings. The same
    ``seed`` gives the same numbers. Raises ValueError naming the systems and ``test_set`` on mismatched input."""
    if n_resamples < 2:
        raise ValueError(f"n_resamples {n_resamples}: need at least 2")
    a = _count_arrays(sys_a, _where(name_a, test_set))
    b = _count_arrays(sys_b, _where(name_b, test_set))
    _check_paired(a, b, name_a, name_b, test_set)
    if a[3][0].sum() <= 0:
        raise ValueError(f"{_where(name_a, test_set)}: the references hold no words: {metric} is undefined")
    stats_a, stats_b = np.stack([a[2], a[3]], axis=-1), np.stack([b[2], b[3]], axis=-1)
    full_a, full_b, deltas = _bootstrap(stats_a, stats_b, _rate, n_resamples, seed, resample_seeds)
    per_seed = (_rate(stats_b.sum(axis=1)) - _rate(stats_a.sum(axis=1))).tolist()
    out = {"metric": metric, "a": name_a, "b": name_b, "test_set": test_set, "score_a": full_a, "score_b": full_b,
           **_summarise(deltas, full_b - full_a), "per_seed_delta": per_seed,
           "mde_seeds": mde(float(np.std(per_seed, ddof=1)), len(per_seed)) if len(per_seed) > 1 else None,
           "n_utterances": int(stats_a.shape[1]), "n_seeds": int(stats_a.shape[0]), "n_resamples": int(n_resamples),
           "seed": seed, "resample_seeds": bool(resample_seeds and stats_a.shape[0] > 1)}
    if return_deltas:
        out["bootstrap_deltas"] = deltas
    return out


def paired_bootstrap_cer(sys_a, sys_b, n_resamples: int = 1000, seed: int = 1, **kw) -> Dict:
    """:func:`paired_bootstrap_wer` on character counts (``utterance_scores(log, "cer")``), labelled CER."""
    return paired_bootstrap_wer(sys_a, sys_b, n_resamples, seed, metric="CER", **kw)


# --------------------------------------------------------------------------------------------------------- BLEU


@contextlib.contextmanager
def _sacrebleu_seed(seed: int):
    """sacreBLEU takes its test's seed from the SACREBLEU_SEED environment variable (read when a PairedTest is made,
    and by its bootstrap CI); set it for the duration, then restore it. Not thread-safe: one test at a time."""
    old = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(seed)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SACREBLEU_SEED", None)
        else:
            os.environ["SACREBLEU_SEED"] = old


def _hyp_seeds(hyps, n_refs: int, where: str) -> List[List[str]]:
    hyps = list(hyps)
    if not hyps:
        raise ValueError(f"{where}: no hypotheses")
    seeds = [hyps] if isinstance(hyps[0], str) else [list(s) for s in hyps]
    for k, s in enumerate(seeds):
        if not all(isinstance(h, str) for h in s):
            raise ValueError(f"{where}: seed {k}: hypotheses must be strings")
        if len(s) != n_refs:
            raise ValueError(f"{where}: seed {k} has {len(s)} hypotheses for {n_refs} references")
    return seeds


def _segment_bleu_stats(hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """sacreBLEU's sufficient statistics of each segment (what :func:`fairseq_smoe.scoring.evaluation.bleu_stats`
    gives for one pair), additive over segments: (n, len(evaluation.BLEU_KEYS)), in BLEU_KEYS' order.

    Extracted by sacreBLEU's own ``BLEU()._extract_corpus_statistics`` (what its PairedTest uses; rows
    ``[sys_len, ref_len, correct_1..4, total_1..4]``) in one call: a corpus_bleu per segment took 50 times longer
    (2.2 s for 3,000 segments), which made the study's statistics cost minutes. paired_bleu checks the summed
    statistics against sacreBLEU's corpus BLEU, so a change of that layout cannot pass silently."""
    from sacrebleu.metrics import BLEU

    rows = np.asarray(BLEU()._extract_corpus_statistics(list(hyps), [list(refs)]), dtype=float)
    order = evaluation.BLEU_ORDER
    column = {"_bleu_sys_len": 0, "_bleu_ref_len": 1}
    column.update({f"_bleu_counts_{i}": 2 + i for i in range(order)})
    column.update({f"_bleu_totals_{i}": 2 + order + i for i in range(order)})
    return rows[:, [column[k] for k in evaluation.BLEU_KEYS]].reshape(len(rows), len(evaluation.BLEU_KEYS))


def _bleu_of_sums(sums: np.ndarray) -> np.ndarray:
    """sacreBLEU's corpus BLEU (exp smoothing, as ``BLEU()`` and fairseq's --scoring sacrebleu) of summed statistics."""
    from sacrebleu.metrics import BLEU

    keys = evaluation.BLEU_KEYS
    order = evaluation.BLEU_ORDER
    flat = np.atleast_2d(sums)
    out = np.array([BLEU.compute_bleu(
        correct=[int(round(s[keys.index(f"_bleu_counts_{i}")])) for i in range(order)],
        total=[int(round(s[keys.index(f"_bleu_totals_{i}")])) for i in range(order)],
        sys_len=int(round(s[keys.index("_bleu_sys_len")])), ref_len=int(round(s[keys.index("_bleu_ref_len")])),
        smooth_method="exp").score for s in flat])
    return out if np.ndim(sums) > 1 else out[0]


def paired_bleu(hyps_a, hyps_b, refs: Sequence[str], method: str = "bs", *, n_samples: int = 0,
                seed: int = SACREBLEU_DEFAULT_SEED, n_resamples: int = 1000, resample_seeds: bool = True,
                name_a: str = "a", name_b: str = "b", test_set: Optional[str] = None) -> Dict:
    """BLEU of two systems on the same references, the difference ``b - a`` and sacreBLEU's paired test.

    ``hyps_a`` / ``hyps_b``: one seed's detokenized hypotheses (a list of strings, in the order of ``refs``) or a list
    of seeds (each such a list; seed k of both systems paired, as in :func:`paired_bootstrap_wer`). ``method``:
    ``bs`` (sacreBLEU's paired bootstrap resampling, as Moses' bootstrap-hypothesis-difference-significance.pl;
    default 1000 resamples) or ``ar`` (approximate randomization; default 10000 trials, and sacreBLEU's bootstrap CI
    per system); ``n_samples`` 0 takes sacreBLEU's default.

    The significance test is sacreBLEU's own (:class:`sacrebleu.significance.PairedTest` with ``BLEU()``, its
    default 13a tokenizer and exp smoothing, exactly ``sacrebleu REF -i A B --paired-bs|--paired-ar``), seeded with
    ``seed`` through SACREBLEU_SEED (0 is refused: sacreBLEU then leaves its test unseeded). With several seeds the
    test runs on the seeds' outputs concatenated (each (seed, segment) one segment, a against b position by
    position). Returned: ``score_a``, ``score_b`` (sacreBLEU's corpus BLEU), ``delta``, ``p_value`` and
    ``sacrebleu_ci95_a`` / ``_b`` (sacreBLEU's bootstrap mean and the half-width of its 95 % interval, per system),
    its ``signature``. Note sacreBLEU counts only resampled differences strictly larger than the observed one, so
    where the observed difference is 0 (identical outputs, ``identical``; or two different outputs of equal BLEU,
    e.g. both 0 for untrained models) and the resampled ones are too, it reports p = 1 / (n_samples + 1), not 1: a
    zero difference is no evidence of one. ``p_value_note`` then says so; the verdict is taken from the CI.

    sacreBLEU gives no interval for the difference, which the MDE and the verdict need: ``ci95``, ``delta_se`` and
    ``mde`` come from the same paired (seed, then segment) bootstrap as :func:`paired_bootstrap_wer`, each resample's
    BLEU computed by sacreBLEU (``BLEU.compute_bleu``) from the summed per-segment statistics; its p-value is
    ``bootstrap_p_value``. Raises ValueError naming the system and ``test_set`` on mismatched lengths."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    if method not in ("bs", "ar"):
        raise ValueError(f"paired_bleu: method {method!r}; choose bs (paired bootstrap) or ar (approximate "
                         f"randomization)")
    if not isinstance(seed, numbers.Integral) or seed <= 0:
        raise ValueError(f"paired_bleu: seed {seed!r}: must be a positive integer (sacreBLEU treats 0 as 'unseeded')")
    if n_resamples < 2:
        raise ValueError(f"n_resamples {n_resamples}: need at least 2")
    refs = list(refs)
    if not refs or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"paired_bleu{' on ' + test_set if test_set else ''}: refs must be a non-empty list of "
                         f"strings")
    seeds_a = _hyp_seeds(hyps_a, len(refs), _where(name_a, test_set))
    seeds_b = _hyp_seeds(hyps_b, len(refs), _where(name_b, test_set))
    if len(seeds_a) != len(seeds_b):
        raise ValueError(f"{name_a} has {len(seeds_a)} seeds{' on ' + test_set if test_set else ''}, {name_b} has "
                         f"{len(seeds_b)}: seeds are paired, both need the same seeds")
    cat_a = [h for s in seeds_a for h in s]
    cat_b = [h for s in seeds_b for h in s]
    cat_refs = refs * len(seeds_a)
    with _sacrebleu_seed(seed):
        test = PairedTest([(name_a, cat_a), (name_b, cat_b)], {"BLEU": BLEU()}, references=[cat_refs],
                          test_type=method, n_samples=n_samples, n_ar_confidence=0 if method == "ar" else -1)
        signatures, results = test()
    (metric_name,) = [k for k in results if k != "System"]
    res_a, res_b = results[metric_name]

    def ci(r):
        return None if r.ci is None else {"mean": float(r.mean), "halfwidth": float(r.ci)}

    stats_a = np.stack([_segment_bleu_stats(s, refs) for s in seeds_a])
    stats_b = np.stack([_segment_bleu_stats(s, refs) for s in seeds_b])
    full_a, full_b, deltas = _bootstrap(stats_a, stats_b, _bleu_of_sums, n_resamples, seed, resample_seeds)
    if abs(full_a - res_a.score) > 1e-6 or abs(full_b - res_b.score) > 1e-6:  # the per-segment sums are sacreBLEU's
        raise RuntimeError(f"paired_bleu: BLEU from summed segment statistics ({full_a}, {full_b}) differs from "
                           f"sacreBLEU's corpus BLEU ({res_a.score}, {res_b.score})")
    summary = _summarise(deltas, float(res_b.score - res_a.score))
    per_seed = [float(x) for x in _bleu_of_sums(stats_b.sum(axis=1)) - _bleu_of_sums(stats_a.sum(axis=1))]
    return {"metric": "BLEU", "a": name_a, "b": name_b, "test_set": test_set, "method": method,
            "score_a": float(res_a.score), "score_b": float(res_b.score), "delta": summary["delta"],
            "p_value": float(res_b.p_value), "identical": cat_a == cat_b,
            "p_value_note": None if res_b.score != res_a.score else
            "equal BLEU: sacreBLEU counts only strictly larger resampled differences, so its small p-value here is "
            "no evidence of a difference (read the CI)",
            "sacrebleu_ci95_a": ci(res_a), "sacrebleu_ci95_b": ci(res_b), "n_samples": int(test.n_samples),
            "signature": signatures[metric_name].format(), "ci95": summary["ci95"], "delta_se": summary["delta_se"],
            "mde": summary["mde"], "bootstrap_p_value": summary["p_value"], "per_seed_delta": per_seed,
            "mde_seeds": mde(float(np.std(per_seed, ddof=1)), len(per_seed)) if len(per_seed) > 1 else None,
            "n_segments": len(refs), "n_seeds": len(seeds_a), "n_resamples": int(n_resamples), "seed": seed,
            "resample_seeds": bool(resample_seeds and len(seeds_a) > 1)}


# ---------------------------------------------------------------------------------------- power and verdicts


def mde(std_of_delta: float, n: int, alpha: float = 0.05, power: float = 0.8, dist: str = "t") -> float:
    """Minimum detectable effect of a paired comparison: the smallest true difference a two-sided test at level
    ``alpha`` detects with probability ``power``.

        MDE = (q(1 - alpha/2) + q(power)) · std_of_delta / √n

    with ``std_of_delta`` the standard deviation of the ``n`` paired differences (e.g. the per-seed differences of
    two systems over n seeds) and q the quantiles of Student's t with n - 1 degrees of freedom (``dist="t"``, the
    usual approximation of the noncentral t) or of the standard normal (``dist="normal"``: 1.960 + 0.842 = 2.80 at
    5 % and 80 %). Reference: H. S. Bloom (1995), "Minimum detectable effects: a simple way to report the
    statistical power of experimental designs", Evaluation Review 19(5):547-556 (MDE = multiplier · standard error);
    the paired-sample form is the one-sample sample-size formula n = (z(1-α/2) + z(1-β))² σ_d² / Δ² on the paired
    differences, solved for Δ (e.g. Chow, Shao & Wang, "Sample Size Calculations in Clinical Research", ch. 3).
    With ``n`` = 1 and ``dist="normal"``, ``std_of_delta`` is read as the standard error of the difference itself
    (:func:`mde_from_bootstrap`)."""
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"mde: alpha {alpha} and power {power} must lie strictly between 0 and 1")
    if n < 1 or int(n) != n:
        raise ValueError(f"mde: n {n}: needs a positive number of paired units")
    if std_of_delta is None or not math.isfinite(std_of_delta) or std_of_delta < 0:
        raise ValueError(f"mde: std_of_delta {std_of_delta!r} must be a finite number >= 0")
    if dist == "t":
        if n < 2:
            raise ValueError("mde: the t approximation needs n >= 2 (n - 1 degrees of freedom); pass dist='normal' "
                             "with a standard error")
        multiplier = _t_quantile(1 - alpha / 2, int(n) - 1) + _t_quantile(power, int(n) - 1)
    elif dist == "normal":
        multiplier = _z_quantile(1 - alpha / 2) + _z_quantile(power)
    else:
        raise ValueError(f"mde: dist {dist!r}; choose t or normal")
    return multiplier * std_of_delta / math.sqrt(n)


def mde_from_bootstrap(deltas: Sequence[float], alpha: float = 0.05, power: float = 0.8) -> float:
    """MDE from a bootstrap distribution of the difference: its standard deviation is the difference's standard
    error, so MDE = (z(1 - alpha/2) + z(power)) · SE (normal; 2.80 · SE at 5 % and 80 %; :func:`mde`)."""
    d = np.asarray(deltas, dtype=float)
    d = d[np.isfinite(d)]
    if d.size < 2:
        raise ValueError("mde_from_bootstrap: needs at least 2 resampled differences")
    return mde(float(d.std(ddof=1)), 1, alpha, power, dist="normal")


def verdict(delta: float, ci: Tuple[float, float], mde: float, claim_direction: str,
            claimed_effect: Optional[float] = None) -> str:
    """The reading of one claim ("b's score is lower / higher than a's") from the difference ``b - a``, its 95 % CI
    and the comparison's MDE. The rule:

    - **confirmed**: the whole CI lies on the claimed side of zero (``hi < 0`` for ``lower``, ``lo > 0`` for
      ``higher``): the difference is significant at 5 % and in the claimed direction.
    - **contradicted**: the whole CI lies on the other side of zero (a significant difference against the claim);
      or a magnitude is claimed (``claimed_effect``, signed, in the metric's units, e.g. -6.35 % relative of Base's
      WER as WER points), the comparison had the power to see it (``|claimed_effect| >= mde``) and the CI excludes it.
    - **not resolved at this power**: otherwise: the CI contains zero and no claimed effect the comparison was powered
      for is ruled out. Effects smaller than the MDE cannot be told from noise here; report the MDE with it."""
    from math import isfinite

    if claim_direction not in (LOWER, HIGHER):
        raise ValueError(f"verdict: claim_direction {claim_direction!r}; choose {LOWER!r} or {HIGHER!r}")
    lo, hi = (float(x) for x in ci)
    if not all(isfinite(x) for x in (delta, lo, hi)) or lo > hi:
        raise ValueError(f"verdict: delta {delta} and CI ({lo}, {hi}) must be finite with lo <= hi")
    if mde is None or not isfinite(mde) or mde < 0:
        raise ValueError(f"verdict: mde {mde!r} must be a finite number >= 0")
    sign = -1.0 if claim_direction == LOWER else 1.0
    # in the claim's orientation: positive = in the claimed direction
    c_lo, c_hi = sorted((sign * lo, sign * hi))
    if c_lo > 0:
        return CONFIRMED
    if c_hi < 0:
        return CONTRADICTED
    if claimed_effect is not None:
        if sign * claimed_effect <= 0:
            raise ValueError(f"verdict: claimed_effect {claimed_effect} is not in the claimed direction "
                             f"({claim_direction})")
        if abs(claimed_effect) >= mde and not lo <= claimed_effect <= hi:
            return CONTRADICTED
    return NOT_RESOLVED


def verdict_of(result: Dict, claim_direction: str, claimed_effect: Optional[float] = None) -> str:
    """:func:`verdict` of a :func:`paired_bootstrap_wer` / :func:`paired_bleu` result (its delta, CI and MDE)."""
    return verdict(result["delta"], result["ci95"], result["mde"], claim_direction, claimed_effect)


# ---------------------------------------------------------------------------------------------- from decode logs


def _log_list(logs) -> List[Path]:
    return [Path(logs)] if isinstance(logs, (str, Path)) else [Path(p) for p in logs]


def paired_test_from_logs(logs_a, logs_b, metric: str, *, name_a: str = "a", name_b: str = "b",
                          method: str = "bs", seed: int = SACREBLEU_DEFAULT_SEED, n_resamples: int = 1000,
                          **kw) -> Dict:
    """One contrast on one test set, from the fairseq-generate logs compare.py keeps: ``logs_a`` / ``logs_b`` a log
    path, or one per seed in the same seed order for both systems. ``metric``: ``wer`` / ``cer``
    (:func:`paired_bootstrap_wer`) or ``bleu`` (:func:`paired_bleu` with ``method``). Every log must be a decoding
    of the same test set (its ``--gen-subset``), which names the test set in the result and in errors."""
    metric = str(metric).lower()
    if metric not in METRICS:
        raise ValueError(f"paired_test_from_logs: metric {metric!r}; choose from {', '.join(METRICS)}")
    paths_a, paths_b = _log_list(logs_a), _log_list(logs_b)
    if not paths_a or not paths_b:
        raise ValueError(f"paired_test_from_logs: no logs for {name_a if not paths_a else name_b}")
    subsets = {}
    for p in paths_a + paths_b:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such decode log (decode the test set first: compare.py --steps decode)")
        with open(p, encoding="utf-8", errors="replace") as f:
            subsets[p] = log_test_set(f.readline())
    named = {s for s in subsets.values() if s}
    if len(named) > 1:
        raise ValueError("paired_test_from_logs: the logs decode different test sets: " +
                         ", ".join(f"{p} ({s})" for p, s in subsets.items()))
    test_set = kw.pop("test_set", None) or (named.pop() if named else None)
    utts_a = [utterance_scores(p, metric) for p in paths_a]
    utts_b = [utterance_scores(p, metric) for p in paths_b]
    if metric == "bleu":
        refs = [u.ref for u in utts_a[0]]
        for name, paths, seeds in ((name_a, paths_a, utts_a), (name_b, paths_b, utts_b)):
            for p, utts in zip(paths, seeds):
                if [u.id for u in utts] != [u.id for u in utts_a[0]] or [u.ref for u in utts] != refs:
                    raise ValueError(f"{name} on {test_set}: {p} holds other utterances or references than "
                                     f"{paths_a[0]}")
        return paired_bleu([[u.hyp for u in s] for s in utts_a], [[u.hyp for u in s] for s in utts_b], refs,
                           method, seed=seed, n_resamples=n_resamples, name_a=name_a, name_b=name_b,
                           test_set=test_set, **kw)
    return paired_bootstrap_wer(utts_a, utts_b, n_resamples, seed, name_a=name_a, name_b=name_b,
                                test_set=test_set, metric=metric.upper(), **kw)
