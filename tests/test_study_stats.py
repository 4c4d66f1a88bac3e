"""The study's statistics (fairseq_smoe.study.stats), checked against values computed by hand on small fixed
examples, against sacreBLEU's own CLI, and against a large-sample formula for the bootstrap's spread."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sacrebleu

from fairseq_smoe.study import stats
from fairseq_smoe.study.stats import Utterance

# quantiles used below (scipy.stats / statistics.NormalDist, as printed in any t table):
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305}  # t(0.975, df)
T80 = {1: 1.376381920, 3: 0.978472312}                    # t(0.80, df)
Z975, Z80 = 1.959963985, 0.841621234                       # normal; sum 2.801585219


# ------------------------------------------------------------------------------------------------ seed_summary


def test_seed_summary_three_seeds_by_hand():
    # mean = (10 + 12 + 14) / 3 = 12; std = sqrt(((-2)^2 + 0 + 2^2) / (3 - 1)) = sqrt(4) = 2
    # half-width = t(0.975, 2) * 2 / sqrt(3) = 4.302652730 * 1.154700538 = 4.968275...
    s = stats.seed_summary([10, 12, 14])
    assert s["n"] == 3 and s["mean"] == pytest.approx(12.0) and s["std"] == pytest.approx(2.0)
    half = T975[2] * 2 / math.sqrt(3)
    assert half == pytest.approx(4.9682754, abs=1e-6)
    assert s["ci95"] == pytest.approx((12 - half, 12 + half), abs=1e-6)
    assert s["note"] is None


def test_seed_summary_two_seeds_by_hand():
    # mean 2, std = sqrt((1 + 1) / 1) = sqrt(2); half = t(0.975, 1) * sqrt(2) / sqrt(2) = 12.7062
    s = stats.seed_summary([1.0, 3.0])
    assert s["std"] == pytest.approx(math.sqrt(2))
    assert s["ci95"] == pytest.approx((2 - T975[1], 2 + T975[1]), abs=1e-6)


def test_seed_summary_one_seed_says_spread_is_unmeasured():
    s = stats.seed_summary([31.5])
    assert s["n"] == 1 and s["mean"] == 31.5
    assert s["std"] is None and s["ci95"] is None  # not 0: one run measures no noise
    assert "one seed" in s["note"] and "not measured" in s["note"]


@pytest.mark.parametrize("values, message", [([], "at least one"), ([1.0, float("nan")], "non-finite"),
                                             (["x"], "one number per seed")])
def test_seed_summary_bad_input_names_the_cell(values, message):
    with pytest.raises(ValueError, match=message) as e:
        stats.seed_summary(values, label="DecS-MoE test_synth_asr_nb")
    assert "DecS-MoE test_synth_asr_nb" in str(e.value)


# ------------------------------------------------------------------------------------- decode logs -> scores


def write_log(path: Path, subset: str, rows, nbest_extra=None, translated=None) -> Path:
    """A fairseq-generate log as compare.py keeps it: the command, then S/T/H/D/P lines in batch order, summary."""
    lines = [f"/x/fairseq-generate data --user-dir p --gen-subset {subset} --path ckpt.pt --beam 3",
             "INFO:fairseq_cli.generate:something"]
    for i, ref, hyp in rows:
        lines += [f"S-{i}\t[audio]", f"T-{i}\t{ref}", f"H-{i}\t-0.5\t{' '.join(hyp)}", f"D-{i}\t-0.5\t{hyp}",
                  f"P-{i}\t-0.1 -0.2"]
        if nbest_extra and i in nbest_extra:
            lines.append(f"D-{i}\t-0.9\t{nbest_extra[i]}")  # the 2nd best of --nbest 2: comes after the best
    n = len(rows) if translated is None else translated
    lines += [f"INFO:fairseq_cli.generate:Translated {n:,} sentences (99 tokens) in 1.0s",
              f"Generate {subset} with beam=3: WER: 42.86"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# in batch order (fairseq sorts by length): ids 2, 0, 1
ROWS = [(2, "Agent.", ""), (0, "Hello, world!", "hello word"), (1, "press one to accept", "press one accept")]


def test_utterance_scores_wer_by_hand(tmp_path):
    log = write_log(tmp_path / "t.log", "test_synth_asr_nb", ROWS, nbest_extra={0: "hello world"})
    utts = stats.utterance_scores(log, "wer")
    # sorted by id; evaluation.normalize_for_wer lowercases and drops punctuation:
    # 0: [hello world] vs [hello word]: 1 substitution / 2 words (the 2nd-best D- line "hello world" is ignored)
    # 1: [press one to accept] vs [press one accept]: 1 deletion / 4 words
    # 2: [agent] vs []: 1 deletion / 1 word
    assert utts == [Utterance(0, "hello word", "Hello, world!", 1, 2),
                    Utterance(1, "press one accept", "press one to accept", 1, 4),
                    Utterance(2, "", "Agent.", 1, 1)]
    # corpus WER = (1 + 1 + 1) / (2 + 4 + 1) = 3 / 7
    assert 100 * sum(u.errors for u in utts) / sum(u.words for u in utts) == pytest.approx(42.857, abs=1e-3)
    with open(log) as f:
        assert stats.log_test_set(f.readline()) == "test_synth_asr_nb"


def test_utterance_scores_cer_and_bleu(tmp_path):
    log = write_log(tmp_path / "t.log", "test_synth_asr_nb", ROWS)
    cer = stats.utterance_scores(log, "CER")
    # 0: "hello world" (11 characters) vs "hello word": 1 deletion; 1: "press one to accept" (19) vs
    # "press one accept": 3 deletions ("to "); 2: "agent" (5) vs "": 5 deletions
    assert [(u.errors, u.words) for u in cer] == [(1, 11), (3, 19), (5, 5)]
    bleu = stats.utterance_scores(log, "bleu")
    assert [(u.hyp, u.ref, u.errors, u.words) for u in bleu] == [
        ("hello word", "Hello, world!", None, None), ("press one accept", "press one to accept", None, None),
        ("", "Agent.", None, None)]


def test_utterance_scores_bad_logs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.log"):
        stats.utterance_scores(tmp_path / "nope.log", "wer")
    with pytest.raises(ValueError, match="metric 'ter'"):
        stats.utterance_scores(write_log(tmp_path / "a.log", "s", ROWS), "ter")
    empty = tmp_path / "empty.log"
    empty.write_text("fairseq-generate --gen-subset s\nTranslated 0 sentences\n")
    with pytest.raises(ValueError, match=r"empty\.log: no T-<id> reference lines"):
        stats.utterance_scores(empty, "wer")
    cut = tmp_path / "cut.log"
    cut.write_text(write_log(tmp_path / "b.log", "s", ROWS).read_text().replace("D-1\t-0.5\tpress one accept\n", ""))
    with pytest.raises(ValueError, match=r"cut\.log: no D- hypothesis line for utterance id\(s\) \[1\]"):
        stats.utterance_scores(cut, "wer")
    twice = tmp_path / "twice.log"
    twice.write_text(write_log(tmp_path / "c.log", "s", ROWS).read_text() + "T-0\tagain\nD-0\t-1\tagain\n")
    with pytest.raises(ValueError, match=r"twice\.log: reference T-0 appears twice"):
        stats.utterance_scores(twice, "wer")
    with pytest.raises(ValueError, match=r"count\.log: fairseq says it translated 1,000 sentences but the log "
                                         r"holds 3"):
        stats.utterance_scores(write_log(tmp_path / "count.log", "s", ROWS, translated=1000), "wer")


# ----------------------------------------------------------------------------------------- paired bootstrap


def test_identical_systems_give_zero_delta_and_p_one():
    sys_a = [(3, 10), (0, 4), (2, 7), (5, 5)]
    r = stats.paired_bootstrap_wer(sys_a, list(sys_a), n_resamples=500, seed=3)
    # WER = 100 * (3 + 0 + 2 + 5) / (10 + 4 + 7 + 5) = 1000 / 26 = 38.4615...
    assert r["score_a"] == r["score_b"] == pytest.approx(1000 / 26)
    assert r["delta"] == 0.0 and r["ci95"] == (0.0, 0.0) and r["p_value"] == 1.0
    assert r["delta_se"] == 0.0 and r["mde"] == 0.0
    assert stats.verdict_of(r, stats.LOWER) == stats.NOT_RESOLVED


def test_one_error_fewer_on_every_utterance_is_exact():
    # every utterance has 5 words and b makes exactly one error fewer: any resample of n utterances has
    # delta = 100 * (-n) / (5 n) = -20 exactly, so the CI is the point (-20, -20)
    a = [(e, 5) for e in (1, 2, 3, 4, 5, 2, 3)]
    b = [(e - 1, 5) for e, _ in a]
    r = stats.paired_bootstrap_wer(a, b, n_resamples=999, seed=1, name_a="Base", name_b="EncDecS-MoE")
    assert r["delta"] == pytest.approx(-20.0)
    assert r["ci95"] == pytest.approx((-20.0, -20.0))
    # no resample reaches 0: p = 2 * (0 + 1) / (999 + 1) = 0.002, the smallest a 999-resample bootstrap can say
    assert r["p_value"] == pytest.approx(0.002)
    assert stats.verdict_of(r, stats.LOWER) == stats.CONFIRMED
    assert stats.verdict_of(r, stats.HIGHER) == stats.CONTRADICTED


def test_better_on_every_utterance_unequal_lengths():
    rng = np.random.default_rng(0)
    words = rng.integers(3, 20, size=50)
    err_a = rng.integers(1, 6, size=50)
    err_b = err_a - rng.integers(1, 2, size=50)  # one fewer everywhere, lengths differ: deltas differ, all < 0
    r = stats.paired_bootstrap_wer(list(zip(err_a, words)), list(zip(err_b, words)), n_resamples=1000, seed=5)
    assert r["ci95"][1] < 0 and r["p_value"] == pytest.approx(2 / 1001)
    assert r["delta"] == pytest.approx(100 * (err_b.sum() - err_a.sum()) / words.sum())


def test_two_utterances_bootstrap_distribution_is_known():
    # a: u0 (1 error / 1 word), u1 (0 / 1); b: u0 (0 / 1), u1 (0 / 1): delta = 0/2 - 1/2 = -50 points.
    # Resamples of 2 from {u0, u1}: {u0, u0} (prob 1/4): b 0 %, a 100 % -> -100; {u0, u1} (1/2): -50;
    # {u1, u1} (1/4): 0. So P(delta* = -100, -50, 0) = 1/4, 1/2, 1/4; P(delta* >= 0) = 1/4 and
    # p = 2 * (B/4 + 1) / (B + 1) ~ 0.5; the 2.5th / 97.5th percentiles are -100 and 0.
    b_res = 4000
    r = stats.paired_bootstrap_wer([(1, 1), (0, 1)], [(0, 1), (0, 1)], n_resamples=b_res, seed=11,
                                   return_deltas=True)
    assert r["delta"] == pytest.approx(-50.0)
    d = r["bootstrap_deltas"]
    assert set(np.round(d, 9)) == {-100.0, -50.0, 0.0}
    share = {v: np.mean(np.isclose(d, v)) for v in (-100.0, -50.0, 0.0)}
    # 4000 draws: standard error of a share of 1/4 is sqrt(0.25 * 0.75 / 4000) = 0.0068; allow 4 of them
    assert share[-100.0] == pytest.approx(0.25, abs=0.03) and share[0.0] == pytest.approx(0.25, abs=0.03)
    assert share[-50.0] == pytest.approx(0.5, abs=0.03)
    assert r["p_value"] == pytest.approx(2 * (share[0.0] * b_res + 1) / (b_res + 1))
    assert r["p_value"] == pytest.approx(0.5, abs=0.06)
    assert r["ci95"] == (-100.0, 0.0)


def test_seeds_are_resampled_not_averaged():
    # one utterance, two paired seeds. a: 1/2 and 1/2 (50 %, 50 %); b: 0/2 and 2/2 (0 %, 100 %).
    # Per-seed deltas -50, +50; pooled: b 2/4 - a 2/4 = 0. Seed resamples: {s0, s0} (1/4) -> -50, {s0, s1} (1/2)
    # -> 0, {s1, s1} (1/4) -> +50: the CI spans the seed noise, -50 to +50.
    a = [[(1, 2)], [(1, 2)]]
    b = [[(0, 2)], [(2, 2)]]
    r = stats.paired_bootstrap_wer(a, b, n_resamples=2000, seed=2, return_deltas=True)
    assert r["n_seeds"] == 2 and r["n_utterances"] == 1 and r["resample_seeds"]
    assert r["delta"] == 0.0 and r["per_seed_delta"] == [-50.0, 50.0]
    assert set(r["bootstrap_deltas"]) == {-50.0, 0.0, 50.0} and r["ci95"] == (-50.0, 50.0)
    # MDE over seeds: std(-50, 50) = 70.7107, n = 2, t with 1 df:
    # (12.706205 + 1.376382) * 70.7107 / sqrt(2) = 14.082587 * 50 = 704.13
    assert r["mde_seeds"] == pytest.approx((T975[1] + T80[1]) * 50, rel=1e-6)
    # averaging over seeds instead hides the seed noise entirely: every resample gives 0
    flat = stats.paired_bootstrap_wer(a, b, n_resamples=200, seed=2, resample_seeds=False)
    assert flat["ci95"] == (0.0, 0.0) and not flat["resample_seeds"]


def test_pooled_wer_over_seeds_is_the_mean_of_seed_wers():
    # seed 0: a 2/10, b 1/10; seed 1: a 4/10, b 4/10 (same references: 10 words in 2 utterances)
    a = [[(1, 4), (1, 6)], [(3, 4), (1, 6)]]
    b = [[(0, 4), (1, 6)], [(2, 4), (2, 6)]]
    r = stats.paired_bootstrap_wer(a, b, n_resamples=100, seed=1)
    # pooled a = 6/20 = 30 % = mean(20 %, 40 %); b = 5/20 = 25 % = mean(10 %, 40 %)
    assert r["score_a"] == pytest.approx(30.0) and r["score_b"] == pytest.approx(25.0)
    assert r["delta"] == pytest.approx(-5.0) and r["per_seed_delta"] == pytest.approx([-10.0, 0.0])
    assert stats.seed_summary([20, 40])["mean"] == pytest.approx(r["score_a"])


def test_bootstrap_spread_matches_the_delta_method_on_a_large_set():
    # D = sum(eb - ea) / sum(w); linearised, Var(D) ~ sum_u z_u^2 / (sum w)^2 with z_u = (eb_u - ea_u) - D w_u
    # (the ratio estimator's standard error); the bootstrap's standard deviation must agree within 10 %.
    rng = np.random.default_rng(42)
    w = rng.integers(3, 16, size=1500)
    ea = rng.binomial(w, 0.30)
    eb = np.minimum(w, rng.binomial(w, 0.25) + (ea > w // 2))  # correlated with a, as two systems' errors are
    d = (eb.sum() - ea.sum()) / w.sum()
    z = (eb - ea) - d * w
    se = 100 * math.sqrt(np.sum(z ** 2)) / w.sum()
    r = stats.paired_bootstrap_wer(list(zip(ea, w)), list(zip(eb, w)), n_resamples=2000, seed=9)
    assert r["delta"] == pytest.approx(100 * d)
    assert r["delta_se"] == pytest.approx(se, rel=0.10)
    # and the 95 % CI is about delta +- 1.96 SE
    assert r["ci95"][0] == pytest.approx(100 * d - Z975 * se, abs=0.25 * se)
    assert r["ci95"][1] == pytest.approx(100 * d + Z975 * se, abs=0.25 * se)
    assert r["mde"] == pytest.approx((Z975 + Z80) * r["delta_se"])


def test_bootstrap_is_deterministic_per_seed():
    rng = np.random.default_rng(1)
    w = rng.integers(2, 12, size=80)
    a = list(zip(rng.binomial(w, 0.4), w))
    b = list(zip(rng.binomial(w, 0.35), w))
    r1 = stats.paired_bootstrap_wer(a, b, n_resamples=300, seed=7)
    r2 = stats.paired_bootstrap_wer(a, b, n_resamples=300, seed=7)
    r3 = stats.paired_bootstrap_wer(a, b, n_resamples=300, seed=8)
    assert r1 == r2
    assert r1["ci95"] != r3["ci95"] and r1["delta"] == r3["delta"]


def test_cer_counts_from_logs(tmp_path):
    log = write_log(tmp_path / "a.log", "test_x_asr_wb", ROWS)
    utts = stats.utterance_scores(log, "cer")
    r = stats.paired_bootstrap_cer(utts, utts, n_resamples=50)
    # CER = (1 + 3 + 5) / (11 + 19 + 5) = 9 / 35
    assert r["metric"] == "CER" and r["score_a"] == pytest.approx(900 / 35) and r["p_value"] == 1.0


def test_mismatched_systems_name_the_systems_and_test_set():
    a = [(1, 3), (0, 2), (1, 4)]
    kw = dict(name_a="Base", name_b="DecS-MoE", test_set="test_synth_asr_nb", n_resamples=10)
    with pytest.raises(ValueError, match=r"Base has 3 utterances on test_synth_asr_nb, DecS-MoE has 2"):
        stats.paired_bootstrap_wer(a, a[:2], **kw)
    with pytest.raises(ValueError, match=r"Base and DecS-MoE on test_synth_asr_nb: utterance 0 has 3 reference "
                                         r"words for one and 5"):
        stats.paired_bootstrap_wer(a, [(1, 5), (0, 2), (1, 4)], **kw)
    with pytest.raises(ValueError, match=r"Base has 1 seeds on test_synth_asr_nb, DecS-MoE has 2"):
        stats.paired_bootstrap_wer(a, [a, a], **kw)
    with pytest.raises(ValueError, match=r"DecS-MoE on test_synth_asr_nb: seed 1 has 2 utterances, seed 0 has 3"):
        stats.paired_bootstrap_wer([a, a], [a, a[:2]], **kw)
    ua = [Utterance(0, "x", "one two", 1, 2), Utterance(1, "y", "three", 1, 1)]
    ub = [Utterance(0, "x", "one two", 1, 2), Utterance(2, "y", "three", 1, 1)]
    with pytest.raises(ValueError, match=r"Base and DecS-MoE on test_synth_asr_nb: utterance ids differ "
                                         r"\(position 1: 1 vs 2\)"):
        stats.paired_bootstrap_wer(ua, ub, **kw)
    uc = [Utterance(0, "x", "one too", 1, 2), Utterance(1, "y", "three", 1, 1)]
    with pytest.raises(ValueError, match=r"the reference of utterance 0 differs \('one two' vs 'one too'\)"):
        stats.paired_bootstrap_wer(ua, uc, **kw)
    with pytest.raises(ValueError, match=r"Base on test_synth_asr_nb: seed 0 has utterances without error counts"):
        stats.paired_bootstrap_wer([u._replace(errors=None, words=None) for u in ua], ua, **kw)
    with pytest.raises(ValueError, match=r"DecS-MoE on test_synth_asr_nb: no utterances"):
        stats.paired_bootstrap_wer(a, [], **kw)
    with pytest.raises(ValueError, match=r"the references hold no words"):
        stats.paired_bootstrap_wer([(1, 0)], [(0, 0)], **kw)


# ------------------------------------------------------------------------------------------------------ MDE


def test_mde_formula_by_hand():
    # normal: (1.959964 + 0.841621) * 2 / sqrt(4) = 2.801585
    assert stats.mde(2.0, 4, dist="normal") == pytest.approx(Z975 + Z80, rel=1e-8)
    # t, 3 df: (3.182446 + 0.978472) * 2 / 2 = 4.160919
    assert stats.mde(2.0, 4) == pytest.approx(T975[3] + T80[3], rel=1e-8)
    assert stats.mde(2.0, 4) == pytest.approx(4.160919, abs=1e-6)
    # alpha 1 %, power 90 %, normal, a standard error of 1: 2.575829 + 1.281552 = 3.857381
    assert stats.mde(1.0, 1, alpha=0.01, power=0.9, dist="normal") == pytest.approx(3.857381, abs=1e-6)
    # more paired units shrink it as 1 / sqrt(n): 16 units -> half of 4 units (normal)
    assert stats.mde(2.0, 16, dist="normal") == pytest.approx(stats.mde(2.0, 4, dist="normal") / 2)


def test_mde_from_bootstrap_by_hand():
    # deltas -1, +1 (500 each): mean 0, std (n - 1) = sqrt(1000 / 999); MDE = 2.801585 * 1.0005006
    deltas = [-1.0, 1.0] * 500
    assert stats.mde_from_bootstrap(deltas) == pytest.approx((Z975 + Z80) * math.sqrt(1000 / 999), rel=1e-8)


@pytest.mark.parametrize("args, message", [((1.0, 1), "needs n >= 2"), ((-1.0, 4), "finite number >= 0"),
                                           ((1.0, 0), "positive number"), ((1.0, 4, 1.5), "strictly between")])
def test_mde_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        stats.mde(*args)


# -------------------------------------------------------------------------------------------------- verdict


@pytest.mark.parametrize("delta, ci, mde, direction, claimed, expected", [
    (-2.0, (-3.0, -1.0), 1.5, "lower", None, "confirmed"),            # CI below 0: WER lower, as claimed
    (2.0, (1.0, 3.0), 1.5, "lower", None, "contradicted"),            # CI above 0: significantly worse
    (-0.5, (-2.0, 1.0), 2.8, "lower", None, "not resolved at this power"),
    (-0.5, (-2.0, 1.0), 2.8, "lower", -3.0, "contradicted"),          # powered for -3 (>= MDE) and the CI excludes it
    (-0.5, (-2.0, 1.0), 4.0, "lower", -3.0, "not resolved at this power"),  # -3 below the MDE: underpowered
    (-0.5, (-2.0, 1.0), 1.0, "lower", -1.5, "not resolved at this power"),  # -1.5 inside the CI
    (1.2, (0.3, 2.1), 0.9, "higher", None, "confirmed"),              # BLEU higher
    (1.2, (0.0, 2.1), 0.9, "higher", None, "not resolved at this power"),  # a bound at 0 does not exclude 0
    (-1.2, (-2.1, -0.3), 0.9, "higher", None, "contradicted"),
])
def test_verdict_rule(delta, ci, mde, direction, claimed, expected):
    assert stats.verdict(delta, ci, mde, direction, claimed) == expected


def test_verdict_bad_input():
    with pytest.raises(ValueError, match="claim_direction 'better'"):
        stats.verdict(-1, (-2, 0.5), 1, "better")
    with pytest.raises(ValueError, match="not in the claimed direction"):
        stats.verdict(-1, (-2, 0.5), 1, "lower", claimed_effect=0.5)
    with pytest.raises(ValueError, match="lo <= hi"):
        stats.verdict(0, (1, -1), 1, "lower")


# ----------------------------------------------------------------------------------------------------- BLEU

REFS = ["the cat sat on the mat", "a dog ran in the park", "hello world again", "please press one now",
        "this package contains the library", "the conference is locked"]
HYP_A = ["the cat sat on mat", "a dog ran in park", "hello world", "please press one", "this package contains",
         "the conference locked"]
HYP_B = ["the cat sat on the mat", "a dog ran in the park", "hello world again", "please press two now",
         "this package contains the library", "the conference is blocked"]


def sacrebleu_cli(tmp_path: Path, flag: list, seed: int) -> list:
    """sacreBLEU's own command line on the same files: the independent reference for paired_bleu."""
    for name, lines in (("ref.txt", REFS), ("a.txt", HYP_A), ("b.txt", HYP_B)):
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "sacrebleu", "ref.txt", "-i", "a.txt", "b.txt", "-m", "bleu",
                           *flag, "--format", "json"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, SACREBLEU_SEED=str(seed)))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_paired_bleu_bs_equals_sacrebleu_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("SACREBLEU_SEED", "99")  # the caller's setting: used for the test, then restored
    r = stats.paired_bleu(HYP_A, HYP_B, REFS, "bs", n_samples=300, seed=7, name_a="Base", name_b="DecS-MoE",
                          test_set="test_synth_es_st_nb")
    cli = sacrebleu_cli(tmp_path, ["--paired-bs", "--paired-bs-n", "300"], seed=7)
    base, sys_b = cli[0]["BLEU"], cli[1]["BLEU"]
    assert r["score_a"] == pytest.approx(base["score"]) and r["score_b"] == pytest.approx(sys_b["score"])
    assert r["score_a"] == pytest.approx(sacrebleu.corpus_bleu(HYP_A, [REFS]).score)
    assert r["delta"] == pytest.approx(sys_b["score"] - base["score"])
    assert r["p_value"] == pytest.approx(sys_b["p_value"])
    assert r["sacrebleu_ci95_a"] == pytest.approx({"mean": base["mean"], "halfwidth": base["ci"]})
    assert r["sacrebleu_ci95_b"] == pytest.approx({"mean": sys_b["mean"], "halfwidth": sys_b["ci"]})
    assert "bs:300" in r["signature"] and "seed:7" in r["signature"] and "tok:13a" in r["signature"]
    assert r["n_samples"] == 300 and r["n_segments"] == 6 and r["metric"] == "BLEU"
    # the difference's own CI and MDE (paired bootstrap over segments, BLEU by sacreBLEU per resample)
    lo, hi = r["ci95"]
    assert lo < r["delta"] < hi and r["mde"] == pytest.approx((Z975 + Z80) * r["delta_se"])
    assert os.environ["SACREBLEU_SEED"] == "99"
    monkeypatch.delenv("SACREBLEU_SEED")
    stats.paired_bleu(HYP_A, HYP_B, REFS, n_samples=10, seed=7)
    assert "SACREBLEU_SEED" not in os.environ


def test_paired_bleu_ar_equals_sacrebleu_cli(tmp_path):
    r = stats.paired_bleu(HYP_A, HYP_B, REFS, "ar", n_samples=500, seed=3)
    cli = sacrebleu_cli(tmp_path, ["--paired-ar", "--paired-ar-n", "500"], seed=3)
    assert r["p_value"] == pytest.approx(cli[1]["BLEU"]["p_value"])
    assert r["score_b"] == pytest.approx(cli[1]["BLEU"]["score"])
    assert r["n_samples"] == 500 and r["sacrebleu_ci95_b"] is not None  # the per-system CI is requested for AR


def test_paired_bleu_identical_systems():
    r = stats.paired_bleu(HYP_A, list(HYP_A), REFS, "bs", n_samples=200, seed=5)
    # sacreBLEU counts only resampled differences strictly above the observed 0: p = (0 + 1) / (200 + 1)
    assert r["identical"] and r["delta"] == 0.0 and r["p_value"] == pytest.approx(1 / 201)
    assert r["ci95"] == (0.0, 0.0) and r["bootstrap_p_value"] == 1.0
    assert "no evidence of a difference" in r["p_value_note"]
    assert stats.verdict_of(r, stats.HIGHER) == stats.NOT_RESOLVED
    # different outputs, both BLEU 0 (no 4-gram matches anywhere, as from untrained models): the same small p
    zero = stats.paired_bleu(["x y"] * 6, ["z"] * 6, REFS, "bs", n_samples=200, seed=5)
    assert not zero["identical"] and zero["score_a"] == zero["score_b"] == 0.0
    assert zero["p_value"] == pytest.approx(1 / 201) and zero["p_value_note"] and zero["ci95"] == (0.0, 0.0)
    assert stats.paired_bleu(HYP_A, HYP_B, REFS, n_samples=50)["p_value_note"] is None


def test_paired_bleu_seeds_concatenate_for_sacrebleu(tmp_path):
    # two seeds: sacreBLEU's test runs on the seeds' outputs one after the other, against the references twice
    r = stats.paired_bleu([HYP_A, HYP_B], [HYP_B, HYP_B], REFS, "bs", n_samples=200, seed=4)
    assert r["score_a"] == pytest.approx(sacrebleu.corpus_bleu(HYP_A + HYP_B, [REFS + REFS]).score)
    assert r["score_b"] == pytest.approx(sacrebleu.corpus_bleu(HYP_B + HYP_B, [REFS + REFS]).score)
    b_score = sacrebleu.corpus_bleu(HYP_B, [REFS]).score
    assert r["per_seed_delta"] == pytest.approx([b_score - sacrebleu.corpus_bleu(HYP_A, [REFS]).score, 0.0])
    assert r["n_seeds"] == 2 and r["resample_seeds"] and r["mde_seeds"] is not None


def test_paired_bleu_is_deterministic_and_bad_input_is_named():
    r1 = stats.paired_bleu(HYP_A, HYP_B, REFS, n_samples=100, seed=9)
    assert r1 == stats.paired_bleu(HYP_A, HYP_B, REFS, n_samples=100, seed=9)
    kw = dict(name_a="Base", name_b="DecS-MoE", test_set="test_synth_es_st_nb")
    with pytest.raises(ValueError, match=r"DecS-MoE on test_synth_es_st_nb: seed 0 has 5 hypotheses for 6 "
                                         r"references"):
        stats.paired_bleu(HYP_A, HYP_B[:5], REFS, **kw)
    with pytest.raises(ValueError, match=r"Base has 1 seeds on test_synth_es_st_nb, DecS-MoE has 2"):
        stats.paired_bleu(HYP_A, [HYP_B, HYP_B], REFS, **kw)
    with pytest.raises(ValueError, match="seed 0: must be a positive integer"):
        stats.paired_bleu(HYP_A, HYP_B, REFS, seed=0)
    with pytest.raises(ValueError, match="method 'xx'"):
        stats.paired_bleu(HYP_A, HYP_B, REFS, method="xx")


# ------------------------------------------------------------------------------------------- from decode logs


def test_paired_test_from_logs_wer_and_bleu(tmp_path):
    rows_b = [(2, "Agent.", "agent"), (0, "Hello, world!", "hello world"), (1, "press one to accept", "press one")]
    base = write_log(tmp_path / "base.log", "test_synth_asr_nb", ROWS)
    moe = write_log(tmp_path / "moe.log", "test_synth_asr_nb", rows_b)
    r = stats.paired_test_from_logs(base, moe, "wer", name_a="Base", name_b="EncDecS-MoE", n_resamples=200, seed=1)
    # b: 0/2 + 2/4 + 0/1 = 2/7; a: 3/7 -> delta = -1/7 = -14.29 points
    assert r["test_set"] == "test_synth_asr_nb" and r["metric"] == "WER"
    assert r["delta"] == pytest.approx(-100 / 7)
    direct = stats.paired_bootstrap_wer(stats.utterance_scores(base, "wer"), stats.utterance_scores(moe, "wer"),
                                        200, 1, name_a="Base", name_b="EncDecS-MoE", test_set="test_synth_asr_nb")
    assert r == direct
    rb = stats.paired_test_from_logs([base, base], [moe, moe], "bleu", n_samples=100, seed=2)
    refs = ["Hello, world!", "press one to accept", "Agent."]
    assert rb["score_b"] == pytest.approx(sacrebleu.corpus_bleu(["hello world", "press one", "agent"] * 2,
                                                                [refs * 2]).score)
    other = write_log(tmp_path / "other.log", "test_real_asr_nb", rows_b)
    with pytest.raises(ValueError, match=r"the logs decode different test sets: .*base\.log \(test_synth_asr_nb\)"):
        stats.paired_test_from_logs(base, other, "wer")
    with pytest.raises(FileNotFoundError, match="missing.log"):
        stats.paired_test_from_logs(base, tmp_path / "missing.log", "wer")


def test_segment_statistics_are_each_segments_own_bleu_statistics():
    """The one-call extraction (sacreBLEU's own) equals evaluation.bleu_stats of every segment alone."""
    import numpy as np

    from fairseq_smoe.scoring import evaluation

    hyps = ["uno dos tres cuatro cinco", "hola", "", "a b c d e f g", "the cat, the mat."]
    refs = ["uno dos tres cuatro seis", "hola mundo", "x y", "a b c d e f g h", "the cat on the mat."]
    fast = stats._segment_bleu_stats(hyps, refs)
    slow = np.array([[evaluation.bleu_stats([h], [r])[k] for k in evaluation.BLEU_KEYS] for h, r in zip(hyps, refs)])
    assert fast.shape == (5, len(evaluation.BLEU_KEYS)) and np.array_equal(fast, slow)
