"""The seeded study (compare.py --seeds N --from-dense UPDATES) end to end at smoke size, on the flite corpus.

One run of all six study systems, 2 seeds, a 4-update trunk and 4 continued updates each: what it trains, what it
decodes, and that its statistics are the numbers of its own decode logs (a contrast's difference is the difference of
the seeds' mean scores; a split log scores as fairseq-generate scores it)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fixture_corpus import have_flite

pytestmark = pytest.mark.skipif(not have_flite(), reason="needs flite")

REPO = Path(__file__).resolve().parents[1]
SEEDS = 2


def compare(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.study.compare", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"compare.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


STUDY_ARGS = ("--preset", "smoke", "--seeds", SEEDS, "--from-dense", 4, "--max-update", 4, "--average-last", 2,
              "--save-every", 1, "--jobs", 2, "--test-sets", "test_*")


@pytest.fixture(scope="module")
def study(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "exp"
    proc = compare("--data", corpus_dir, "--out", out, *STUDY_ARGS)
    return {"out": out, "data": corpus_dir, "proc": proc, "results": json.loads((out / "results.json").read_text())}


def test_every_system_starts_from_its_seeds_dense_trunk(study):
    from fairseq_smoe.study.seeded import STUDY_SYSTEMS

    out, results = study["out"], study["results"]
    assert results["seeds"] == [1, 2] and results["from_dense"] == 4
    assert set(results["systems"]) == {name for name, _ in STUDY_SYSTEMS}
    for seed in (1, 2):
        trunk_log = (out / f"seed{seed}" / "dense" / "train.log").read_text()
        assert f"--seed {seed}" in trunk_log and "--arch s2t_smoe_base_xs" in trunk_log
        assert results["trunks"][str(seed)]["updates"] == 4
        for name, sid in STUDY_SYSTEMS:
            d = out / f"seed{seed}" / sid.replace("+", "_")
            upcycle_log = (d / "upcycle.log").read_text()
            assert str(out / f"seed{seed}" / "dense" / "checkpoint_last.pt") in upcycle_log.splitlines()[0]
            first = (d / "train.log").read_text().splitlines()[0]
            assert f"--finetune-from-model {d / 'upcycled.pt'}" in first and f"--seed {seed}" in first
            assert results["systems"][name]["seeds"][str(seed)]["updates"] == 4
    lang = (out / "seed1" / "s2t_dec_smoe_lang" / "train.log").read_text().splitlines()[0]
    assert "--config-yaml config_lang.yaml" in lang
    assert "label_smoothed_cross_entropy_moe_asr_ctc" in (out / "seed1" / "s2t_encdec_lmoe" / "train.log").read_text()


def test_each_system_is_decoded_with_the_wrong_labels_its_experts_read(study):
    results = study["results"]
    expected = {"Base": {"labels"}, "DecFFNx2": {"labels"}, "Learned gate": {"labels"},
                "DecS-MoE": {"labels", "other_task_decoder"}, "DecS-MoE per language": {"labels", "other_task_decoder"},
                "EncDecS-MoE": {"labels", "wrong_encoder", "spectral", "other_task_decoder"}}
    for name, want in expected.items():
        for seed in ("1", "2"):
            variants = results["systems"][name]["seeds"][seed]["variants"]
            assert set(variants) == want, name
            for v in variants.values():
                assert set(v["tests"]) == set(results["test_sets"])
    # the wrong-label manifest swaps every row's bandwidth; the rerouted decoder says which expert each route ran
    view = study["out"] / "view"
    labels = [line.split("\t") for line in (view / "study_labels.tsv").read_text().splitlines()]
    swapped = [line.split("\t") for line in (view / "study_wrong_encoder.tsv").read_text().splitlines()]
    bw = labels[0].index("bandwidth")
    assert len(labels) == len(swapped) and all(a[bw] != b[bw] for a, b in zip(labels[1:], swapped[1:]))
    mapping = json.loads((study["out"] / "seed1" / "s2t_dec_smoe" / "decode_other_task_decoder" / "rerouted.json")
                         .read_text())
    assert mapping == {"transcribe": "translate", "translate": "transcribe"}


def test_split_logs_hold_every_test_row_once_in_manifest_order(study):
    out, data = study["out"], study["data"]
    combined = (out / "seed1" / "s2t_dec_smoe" / "decode_labels" / "study_labels.log").read_text()
    assert len(re.findall(r"^T-\d+\t", combined, re.M)) == sum(
        len((data / f"{s}.tsv").read_text().splitlines()) - 1 for s in study["results"]["test_sets"])
    for subset in study["results"]["test_sets"]:
        log = (out / "seed1" / "s2t_dec_smoe" / "decode_labels" / f"{subset}.log").read_text()
        assert f"--gen-subset {subset}" in log.splitlines()[0]
        ids = [int(i) for i in re.findall(r"^T-(\d+)\t", log, re.M)]
        assert sorted(ids) == list(range(len((data / f"{subset}.tsv").read_text().splitlines()) - 1))
        assert len(re.findall(r"^D-\d+\t", log, re.M)) == len(ids)


def test_a_split_log_scores_as_fairseq_generate_scores_it(study, tmp_path):
    """score_log's WER/BLEU on a test set decoded alone equals fairseq-generate's own WER/BLEU line."""
    from argparse import Namespace

    from fairseq_smoe.study import compare as cmp
    from fairseq_smoe.study.seeded import score_log

    ckpt = study["out"] / "seed1" / "s2t_dec_smoe" / "checkpoint_avg2.pt"
    args = Namespace(data=study["data"], max_tokens=20000, beam=1, num_workers=0, precision="fp32", cpu=True,
                     threads=1, steps={"decode"})
    for subset, task in (("test_asr_nb", "asr"), ("test_st_wb", "st")):
        printed = cmp.decode(args, ckpt, subset, task, tmp_path)
        ours = score_log(tmp_path / f"{subset}.log", task)
        assert ours["n"] == printed["n"]
        assert ours["score"] == pytest.approx(printed["score"], abs=0.01), subset


def test_statistics_are_the_numbers_of_the_decode_logs(study):
    results, st = study["results"], study["results"]["statistics"]
    for name, system in results["systems"].items():
        for subset in results["test_sets"]:
            s = st["summary"][name][subset]
            per_seed = [system["seeds"][k]["variants"]["labels"]["tests"][subset]["score"] for k in ("1", "2")]
            assert s["per_seed"] == pytest.approx(per_seed) and s["n"] == SEEDS
            assert s["mean"] == pytest.approx(sum(per_seed) / 2)
            # Student t with 1 degree of freedom: 12.706 * std / sqrt(2)
            std = abs(per_seed[0] - per_seed[1]) / math.sqrt(2)
            assert s["std"] == pytest.approx(std)
            assert s["ci95"][1] - s["mean"] == pytest.approx(12.7062 * std / math.sqrt(2), rel=1e-4)
    contrasts = {(c["a"], c["b"], c["test_set"]): c for c in st["contrasts"]}
    for a, b in (("Base", "DecS-MoE"), ("DecFFNx2", "DecS-MoE"), ("DecS-MoE", "EncDecS-MoE"),
                 ("EncDecS-MoE", "Learned gate")):
        c = contrasts[(a, b, "test_asr_nb")]
        # corpus WER over seeds of the same references = the mean of the seeds' WERs
        assert c["delta"] == pytest.approx(st["summary"][b]["test_asr_nb"]["mean"] - st["summary"][a]["test_asr_nb"]["mean"])
        assert c["ci95"][0] <= c["ci95"][1] and 0 < c["p_value"] <= 1 and c["mde"] >= 0
        assert c["n_seeds"] == SEEDS and c["verdict"] in ("confirmed", "contradicted", "not resolved at this power")
        assert contrasts[(a, b, "ASR NB")]["n_utterances"] == c["n_utterances"]  # one NB ASR set in the fixture
    bleu = contrasts[("Base", "DecS-MoE", "test_st_nb")]
    assert bleu["metric"] == "BLEU" and "signature" in bleu
    assert ("DecS-MoE", "DecS-MoE per language", "test_asr_nb") not in contrasts  # an ST-only contrast
    rob = [r for r in st["robustness"] if r["system"] == "EncDecS-MoE" and r["variant"] == "wrong_encoder"]
    assert {r["test_set"] for r in rob} >= set(results["test_sets"])
    claims = {c["claim"]: c for c in st["claims"]}
    first = claims["EncDecS-MoE: -6.35 % relative WER on NB vs Base (hard sharing)"]
    assert first["claimed_delta"] == pytest.approx(-0.0635 * first["score_a"])


def test_tables_rebuild_from_results_json_and_a_rerun_does_nothing(study, tmp_path):
    out = study["out"]
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.study.report", out / "results.json", "--out", tmp_path],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 10000
    md = (out / "results.md").read_text()
    assert "## Verdicts" in md and "± " in md and "| DecS-MoE vs Base | ASR NB |" in md
    before = json.loads((out / "results.json").read_text())["statistics"]
    again = compare("--data", study["data"], "--out", out, *STUDY_ARGS)
    assert "trained already" in again.stderr and "fairseq-train ..." not in again.stderr
    assert json.loads((out / "results.json").read_text())["statistics"] == before


def test_statistics_do_not_depend_on_the_number_of_processes(study):
    """The run computed its paired tests in 2 processes (--jobs 2); one process gives the same numbers."""
    from fairseq_smoe.study import report

    results = json.loads((study["out"] / "results.json").read_text())
    again = report.statistics(results, study["out"], jobs=1)
    assert json.loads(json.dumps(again)) == results["statistics"]


def test_bad_study_flags_are_refused(corpus_dir, tmp_path):
    for flags, message in ((("--seeds", 0), "--seeds 0: must be at least 1"),
                           (("--from-dense", -5), "--from-dense -5"),
                           (("--seeds", 2, "--systems", "s2t_nope"), "--systems: unknown ['s2t_nope']")):
        proc = compare("--data", corpus_dir, "--out", tmp_path / "x", "--preset", "smoke", *flags, check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_the_committed_study_tables_regenerate_from_their_results_json(tmp_path):
    """examples/demo/results/study_*.md is what report.py writes from the committed results.json (nothing hand-edited
    in the numbers the README quotes)."""
    committed = sorted((REPO / "examples" / "demo" / "results").glob("study_*.json"))
    assert committed, "the study's results are committed under examples/demo/results/"
    for path in committed:
        out = tmp_path / path.stem
        proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.study.report", path, "--out", out], cwd=REPO,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (out / "results.md").read_text() == path.with_suffix(".md").read_text(), path
        results = json.loads(path.read_text())
        assert results["seeds"] == [1, 2, 3] and results["from_dense"] > 0
        from fairseq_smoe.study import stats

        for claim in results["statistics"]["claims"]:  # each verdict follows from its own numbers by stats.verdict
            lower = claim["metric"] == "WER"
            if claim["claim"].startswith("Q3"):  # "the wrong label hurts": a higher WER, a lower BLEU
                lower = not lower
            assert claim["verdict"] == stats.verdict(claim["delta"], claim["ci95"], claim["mde"],
                                                     stats.LOWER if lower else stats.HIGHER,
                                                     claim["claimed_delta"]), claim["claim"]
