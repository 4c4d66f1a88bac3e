"""Smoke run of benchmarks/rtf.py with a toy model: the hub API is timed on every case and the report is written.

Not a timing test: the figures of a toy run mean nothing. What is checked is what makes the figures comparable:
every case decodes all its audio, every hypothesis has the forced length, the inputs took the routes the case
names, the API formed the batches the case describes, and the ratios are those of the figures.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rtf.py"
TOY = ["--tiny", "--sizes", "xs", "--utts", "4", "--seconds", "0.5", "--tokens", "4", "--beam", "2", "--vocab", "300",
       "--repeats", "1", "--batch-sizes", "1,4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rtf") / "rtf_cpu"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TOY, "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"stdout": proc.stdout, "json": json.loads(out.with_suffix(".json").read_text()),
            "md": out.with_suffix(".md").read_text()}


def test_every_case_of_every_system_is_measured(run):
    runs = run["json"]["runs"]
    assert sorted(runs) == ["xs base", "xs smoe"]
    assert runs["xs smoe"]["arch"] == "s2t_encdec_smoe_xs" and runs["xs base"]["arch"] == "s2t_smoe_base_xs"
    assert runs["xs smoe"]["params"] > runs["xs base"]["params"]  # the experts
    for r in runs.values():
        assert sorted(r["cases"]) == ["b1 mixed", "b1 one-route", "b4 mixed", "b4 mixed-in-batch", "b4 one-route"]
        for e in r["cases"].values():
            assert e["audio_s"] == pytest.approx(4 * 0.5)
            assert len(e["cpu_s"]) == 1 and e["median_cpu_s"] > 0 and e["median_wall_s"] > 0
            assert e["x_realtime"] == pytest.approx(e["audio_s"] / e["median_cpu_s"])
            assert e["rtf"] == pytest.approx(1 / e["x_realtime"])
            assert e["hyp_tokens"] == [4 + 1]  # forced length, plus </s>: the same decoder steps everywhere


def test_cases_take_the_routes_and_batches_they_name(run):
    cases = run["json"]["runs"]["xs smoe"]["cases"]
    assert cases["b1 one-route"]["bandwidths"] == ["wb"] and cases["b1 one-route"]["batches"] == [1, 1, 1, 1]
    assert cases["b4 one-route"]["batches"] == [4] and cases["b4 one-route"]["mixed_batches"] == 0
    # 8 kHz inputs are detected NB, 16 kHz WB; batched by route pair they make two batches, else one mixed batch
    assert cases["b4 mixed"]["bandwidths"] == ["nb", "wb"]
    assert cases["b4 mixed"]["batches"] == [2, 2] and cases["b4 mixed"]["mixed_batches"] == 0
    assert cases["b4 mixed-in-batch"]["batches"] == [4] and cases["b4 mixed-in-batch"]["mixed_batches"] == 1


def test_ratios_and_report(run):
    res = run["json"]
    smoe, base = res["runs"]["xs smoe"]["cases"], res["runs"]["xs base"]["cases"]
    ratios = {(r["run"], r["what"]): r["ratio"] for r in res["ratios"]}
    assert ratios[("xs smoe", "b4 mixed / one-route")] == pytest.approx(
        smoe["b4 mixed"]["x_realtime"] / smoe["b4 one-route"]["x_realtime"])
    assert ratios[("xs smoe", "one-route b4 / b1")] == pytest.approx(
        smoe["b4 one-route"]["x_realtime"] / smoe["b1 one-route"]["x_realtime"])
    # S-MoE / Base: per repeat (one here), the two calls made back to back
    paired = {r["what"]: r["per_repeat"] for r in res["ratios"] if r["run"] == "xs smoe" and "per_repeat" in r}
    assert sorted(paired) == sorted(f"{case}: smoe / base" for case in smoe)
    assert paired["b1 one-route: smoe / base"] == pytest.approx(
        [base["b1 one-route"]["cpu_s"][0] / smoe["b1 one-route"]["cpu_s"][0]])
    assert ratios[("xs smoe", "b1 one-route: smoe / base")] == pytest.approx(
        smoe["b1 one-route"]["x_realtime"] / base["b1 one-route"]["x_realtime"])
    assert res["machine"]["torch_threads"] == 1 and res["machine"]["OMP_NUM_THREADS"] == "1"
    for text in (run["md"], run["stdout"]):
        assert "| xs | smoe (s2t_encdec_smoe_xs) |" in text and "### Ratios" in text
        assert "OMP_NUM_THREADS=1" in text and "2 x 2" in text


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "xxl"], "--sizes: unknown or no value(s) ['xxl']"),
    (["--batch-sizes", "0"], "--batch-sizes: positive integers, got [0]"),
    (["--tokens", "2"], "--tokens: at least 3"),
])
def test_bad_arguments_are_refused(argv, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
