"""Smoke run of benchmarks/speed.py at toy sizes: it measures every system and writes figures and ratios.

Not a timing test: the figures of a toy run mean nothing; what is checked is that every measure is produced for every
system, ratios are relative to Base, and the report and JSON are written.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
SYSTEMS = ["base", "smoe-1route", "smoe-mixed", "lmoe"]


def test_benchmark_smoke_run_prints_and_writes_ratios(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "xs", "--devices", "cpu", "--repeats", "2", "--batch-size", "2",
         "--frames", "120", "--target-len", "6", "--decode-utts", "2", "--decode-len", "3", "--beam", "2",
         "--data-utts", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    stdout = proc.stdout
    for measure in ("forward", "decode", "train"):
        row = re.search(rf"^\| {measure} \|(.*)\|$", stdout, re.M)
        assert row, stdout
        cells = row.group(1).split("|")
        assert len(cells) == len(SYSTEMS)
        assert "**x1.000**" in cells[0]  # Base against itself
        assert all(re.search(r"[\d.]+ ms \([\d.]+-[\d.]+\) \*\*x[\d.]+\*\*", c) for c in cells)
    assert re.search(r"^\| memory \(training memory growth", stdout, re.M)
    assert re.search(r"Data pipeline: [\d.]+ utterances/s .* consumes [\d.]+/s: x[\d.]+ headroom", stdout)
    assert re.search(r"xs cpu fp32 forward smoe-mixed/base = [\d.]+ \(target <= 1.08\): (met|MISSED)", stdout)
    assert re.search(r"xs cpu fp32 train lmoe/base = [\d.]+, lmoe/smoe-1route = [\d.]+", stdout)
    assert "load average" in stdout

    results = json.loads(out.with_suffix(".json").read_text())
    run = results["runs"]["xs cpu fp32"]
    for measure in ("forward", "decode", "train"):
        assert set(run[measure]) == set(SYSTEMS)
        assert run[measure]["base"]["ratio"] == 1.0
        for system in SYSTEMS:
            e = run[measure][system]
            assert e["n"] == 2 and e["median_ms"] > 0 and math.isfinite(e["ratio"]) and e["ratio"] > 0
            assert e["q1_ms"] <= e["median_ms"] <= e["q3_ms"]
    mem = run["memory"]
    assert set(mem) == set(SYSTEMS) and all(m["peak_rss_mb"] > m["rss_before_mb"] > 0 for m in mem.values())
    assert run["data"]["utts_per_s"] > 0 and run["data"]["need_utts_per_s"] > 0
    # the S-MoE and learned-gate models really have more parameters than Base, and S-MoE's active ones equal Base's
    p = run["params"]
    assert p["smoe-1route"]["total"] > p["base"]["total"]
    assert set(p["smoe-1route"]["active"].values()) == {p["base"]["total"]}
    assert p["lmoe"]["total"] > p["smoe-1route"]["total"]
    assert "### Targets" in out.with_suffix(".md").read_text()


def test_unknown_size_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "xxl"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--sizes: unknown size(s) ['xxl']" in proc.stderr
