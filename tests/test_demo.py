"""The demo pipeline (fairseq_smoe.study.compare) on the offline corpus fixture: four systems trained with
fairseq-train for a few updates, test sets decoded with fairseq-generate, results.json/md/png written; a rerun
skips everything finished."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fairseq_smoe.scoring.evaluation import cer_stats
from test_offline_corpus import build_fixture, prep_args, read_tsv, run_prep

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ["Base", "DecFFNx2", "DecS-MoE", "EncDecS-MoE"]
TEST_SETS = ["test_real_asr_nb", "test_real_es_st_nb", "test_synth_asr_wb"]


def compare(data: Path, out: Path):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "fairseq_smoe.study.compare", "--data", str(data), "--out",
                           str(out), "--preset", "smoke", "--test-sets", ",".join(TEST_SETS)],
                          capture_output=True, text=True, env=env, timeout=1800)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    fixture = build_fixture(root / "debian")
    data = root / "data"
    proc = run_prep(prep_args(fixture, data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "exp"
    proc = compare(data, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data, out, proc


def test_results_have_every_system_and_test_set(demo):
    data, out, _ = demo
    results = json.loads((out / "results.json").read_text())
    assert list(results["systems"]) == SYSTEMS
    assert results["max_update"] == 4 and results["size"] == "_xs"
    assert results["ctc_weight"] == 0.3  # the smoke preset trains with the auxiliary CTC loss, like quick and full
    for name, sysres in results["systems"].items():
        assert sysres["updates"] == 4, name
        assert sysres["first_loss"] > 0 and sysres["train_seconds"] > 0
        log = (out / sysres["arch"].replace("_xs", "") / "train.log").read_text()
        assert "--criterion label_smoothed_cross_entropy_asr_ctc --ctc-weight 0.3" in log
        assert "ctc_loss" in log
        assert set(sysres["tests"]) == set(TEST_SETS)
        for subset, r in sysres["tests"].items():
            assert r["n"] == len(read_tsv(data / f"{subset}.tsv")), (name, subset)
            if "_asr_" in subset:
                assert r["metric"] == "WER" and r["score"] >= 0 and r["empty_hyp_wer"] == 100.0
                assert r["cer"] >= 0
                # the CTC head's greedy output, written per utterance; its CER recomputed from that file
                ctc_rows = [line.split("\t") for line in (out / sysres["arch"].replace("_xs", "") / "decode" /
                                                          f"{subset}.ctc.tsv").read_text().splitlines()]
                assert r["ctc"]["n"] == len(ctc_rows) == r["n"]
                assert sorted(x[0] for x in ctc_rows) == sorted(t["id"] for t in read_tsv(data / f"{subset}.tsv"))
                stats = cer_stats([x[2] if len(x) > 2 else "" for x in ctc_rows], [x[1] for x in ctc_rows])
                assert r["ctc"]["cer"] == round(100.0 * stats["_cer_errors"] / stats["_cer_chars"], 2)
                # and fairseq-generate again with joint CTC/attention beam search, in its own log
                joint_log = (out / sysres["arch"].replace("_xs", "") / "decode" / f"{subset}.joint.log").read_text()
                assert "--ctc-decode-weight 0.3" in joint_log.splitlines()[0]
                assert r["joint"]["ctc_decode_weight"] == 0.3 and r["joint"]["n"] == r["n"]
                assert f"WER: {r['joint']['score']:.2f}" in joint_log and r["joint"]["cer"] >= 0
            else:
                assert r["metric"] == "BLEU" and 0 <= r["score"] <= 100
        # S-MoE adds experts but not active weights; DecFFNx2 is wider everywhere
        p = sysres["params"]
        assert p["total_M"] >= p["active_M"] > 0
    p = {n: results["systems"][n]["params"] for n in SYSTEMS}
    assert p["Base"]["total_M"] == p["Base"]["active_M"] == p["DecS-MoE"]["active_M"] == p["EncDecS-MoE"]["active_M"]
    assert p["Base"]["total_M"] < p["DecS-MoE"]["total_M"] < p["EncDecS-MoE"]["total_M"]


def test_markdown_table_rows_and_columns(demo):
    data, out, proc = demo
    md = (out / "results.md").read_text()
    sections = {s.split("\n")[0]: s for s in md.split("### ")[1:]}
    assert [t.split(" (")[0] for t in sections] == ["ASR: WER %", "ASR: WER % with joint CTC/attention decoding",
                                                    "ST: BLEU", "ASR: CER %"]
    asr, joint, st, cer = sections.values()
    header = next(line for line in asr.splitlines() if line.startswith("| system"))
    assert header == "| system | params total / active (M) | real NB | synth WB |"
    rows = [line.split(" | ")[0].strip("| ") for line in asr.splitlines() if line.startswith("| ")][1:]
    assert rows == SYSTEMS + ["*empty hypothesis*", "*best constant hypothesis*", "*utterances*"]
    assert "| *empty hypothesis* | | 100.0 | 100.0 |" in asr
    # the constant-hypothesis floor is recomputed here from the manifests, independently of compare.py
    from fairseq_smoe.study import constant_baseline

    train = read_tsv(data / "train.tsv")
    expected = {s: constant_baseline.for_test_set(data, s, train) for s in TEST_SETS}
    assert json.loads((out / "results.json").read_text())["constant_hypothesis"] == expected
    assert (f"| *best constant hypothesis* | | {expected['test_real_asr_nb']['score']:.1f} | "
            f"{expected['test_synth_asr_wb']['score']:.1f} |") in asr
    assert 0 < expected["test_real_asr_nb"]["score"] <= 100 and expected["test_real_es_st_nb"]["metric"] == "BLEU"
    assert "| system | params total / active (M) | real es NB |" in st
    results = json.loads((out / "results.json").read_text())
    rows = [line.split(" | ")[0].strip("| ") for line in joint.splitlines() if line.startswith("| ")][1:]
    assert rows == SYSTEMS + ["*empty hypothesis*", "*best constant hypothesis*", "*utterances*"]
    base = results["systems"]["Base"]["tests"]
    assert (f"| Base | {results['systems']['Base']['params']['total_M']} / "
            f"{results['systems']['Base']['params']['active_M']} | {base['test_real_asr_nb']['joint']['score']:.1f} | "
            f"{base['test_synth_asr_wb']['joint']['score']:.1f} |") in joint
    rows = [line.split(" | ")[:2] for line in cer.splitlines() if line.startswith("| ")][1:]
    assert [r[0].strip("| ") + "/" + r[1] for r in rows[:12]] == \
        [f"{n}/{o}" for n in SYSTEMS for o in ("decoder", "CTC", "joint")]
    assert "| *best constant hypothesis* | | " in cer
    assert md in proc.stdout


def test_chart_is_a_png(demo):
    _, out, _ = demo
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000


def test_rerun_skips_finished_training_and_decoding(demo):
    data, out, _ = demo
    before = json.loads((out / "results.json").read_text())
    mtimes = {p: p.stat().st_mtime for p in out.rglob("*.pt")}
    start = time.time()
    proc = compare(data, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("trained already") == 4
    assert "fairseq-generate" not in proc.stderr
    assert {p: p.stat().st_mtime for p in out.rglob("*.pt")} == mtimes
    after = json.loads((out / "results.json").read_text())
    assert after["systems"] == before["systems"]
    assert time.time() - start < 120


def test_changed_settings_are_refused(demo, tmp_path):
    data, out, _ = demo
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.study.compare", "--data", str(data), "--out",
                           str(out), "--preset", "smoke", "--max-update", "5", "--systems", "s2t_smoke_base"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "--systems: unknown ['s2t_smoke_base']" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.study.compare", "--data", str(data), "--out",
                           str(out), "--preset", "smoke", "--max-update", "5", "--systems", "s2t_smoe_base"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "holds a system trained with other settings" in proc.stderr


def test_parallel_jobs_train_and_decode_each_system(demo, tmp_path):
    data, _, _ = demo
    out = tmp_path / "exp"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.study.compare", "--data", str(data), "--out",
                           str(out), "--preset", "smoke", "--jobs", "2", "--systems", "s2t_smoe_base,s2t_dec_smoe",
                           "--test-sets", "test_real_asr_nb"], capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["jobs"] == 2 and list(results["systems"]) == ["Base", "DecS-MoE"]
    for arch in ("s2t_smoe_base", "s2t_dec_smoe"):
        assert (out / arch / "DONE").exists() and (out / arch / "decode" / "test_real_asr_nb.json").exists()
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.study.compare", "--data", str(data), "--out",
                           str(out), "--preset", "smoke", "--jobs", "0"], capture_output=True, text=True)
    assert proc.returncode != 0 and "--jobs 0: must be at least 1" in proc.stderr


def test_ctc_greedy_refuses_an_st_test_set(demo):
    data, out, _ = demo
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.study.ctc_greedy", "--path",
                           str(out / "s2t_smoe_base" / "checkpoint_last.pt"), "--data", str(data), "--subset",
                           "test_real_es_st_nb", "--cpu"], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "test_real_es_st_nb: not an ASR test set" in proc.stderr


# --- GPU defaults of the full preset and the time projection (no training: compare.py's functions directly) ---

def compare_module():
    from fairseq_smoe.study import compare

    return compare


def train_line(updates: int, wall: int) -> str:
    return (f"2026-12-01 07:09:04 | INFO | train_inner | epoch 001:     {updates} / 900 loss=8.192, nll_loss=8.175, "
            f"ctc_loss=None, ppl=288.97, wps=0, ups=0, wpb=216, bsz=16, num_updates={updates}, lr=0.0005, "
            f"gnorm=2.304, clip=0, loss_scale=128, train_wall={wall - 2}, wall={wall}")


def test_full_preset_trains_and_decodes_in_mixed_precision_with_enough_workers(monkeypatch, tmp_path):
    c = compare_module()
    data, out = tmp_path / "data", tmp_path / "exp"
    assert c.resolve_precision("auto", cpu=False, bf16_supported=lambda: True) == "bf16"
    assert c.resolve_precision("auto", cpu=False, bf16_supported=lambda: False) == "fp16"
    assert c.resolve_precision("auto", cpu=True, bf16_supported=lambda: True) == "fp32"
    assert c.resolve_precision("auto", cpu=False, bf16_supported=lambda: None) == "fp32"  # no CUDA device
    assert c.resolve_precision("fp32", cpu=False) == "fp32"
    for cores, workers in ((2, 2), (16, 8), (None, 1)):
        monkeypatch.setattr(c.os, "cpu_count", lambda: cores)
        assert c.resolve_num_workers("auto") == workers
    monkeypatch.setattr(c.os, "cpu_count", lambda: 16)
    real = c.resolve_precision
    for bf16, flags in ((True, ["--amp", "--amp-dtype", "bfloat16"]), (False, ["--fp16"])):
        # as on a GPU with (without) bf16
        monkeypatch.setattr(c, "resolve_precision", lambda p, cpu, _bf16=bf16: real(p, cpu, lambda: _bf16))
        args = c.parse_args(["--data", str(data), "--out", str(out), "--preset", "full"])
        cmd = " ".join(c.train_cmd(args, "s2t_encdec_smoe", out / "x"))
        assert "--num-workers 8" in cmd and " ".join(flags) in cmd and "--cpu" not in cmd
        assert args.precision == ("bf16" if bf16 else "fp16")
    # the CPU presets are unchanged: fp32, no workers
    for preset in ("quick", "smoke"):
        args = c.parse_args(["--data", str(data), "--out", str(out), "--preset", preset])
        cmd = c.train_cmd(args, "s2t_encdec_smoe", out / "x")
        assert args.precision == "fp32" and "--amp" not in cmd and "--fp16" not in cmd
        assert cmd[cmd.index("--num-workers") + 1] == "0" and cmd[-1] == "--cpu"
    # explicit choices win; fp16 on the CPU is refused by name
    args = c.parse_args(["--data", str(data), "--out", str(out), "--preset", "full", "--precision", "fp32",
                         "--num-workers", "3"])
    assert args.precision == "fp32" and args.num_workers == 3
    with pytest.raises(SystemExit, match="--precision fp16 needs a GPU"):
        c.parse_args(["--data", str(data), "--out", str(out), "--preset", "quick", "--precision", "fp16"])


def test_time_projection_from_the_training_log():
    c = compare_module()
    assert c.project_train_time("", 1000) is None
    assert c.project_train_time(train_line(25, 40), 1000) is None  # one interval: no rate yet
    # start-up (40 s before update 25) is not in the rate: 0.2 s/update from update 25 to 125
    log = "\n".join([train_line(25, 40), "some other line", train_line(75, 50), train_line(125, 60)])
    p = c.project_train_time(log, 1000)
    assert p == {"status": "projection", "max_update": 1000, "updates_done": 125, "measured_over_updates": [25, 125],
                 "seconds_per_update": 0.2, "projected_seconds": 60 + 875 * 0.2}


def test_running_training_logs_and_records_its_projection_then_the_measured_time(tmp_path, caplog):
    c = compare_module()
    progress = c.Progress(tmp_path, ["a", "b"], 1000, jobs=2)
    seen = []
    script = "; ".join(["import time", f"print({train_line(25, 40)!r}, flush=True)", "time.sleep(0.6)",
                        f"print({train_line(125, 60)!r}, flush=True)", "time.sleep(0.9)"])

    def on_progress(text):
        p = c.project_train_time(text, 1000)
        if p:
            seen.append(p)
            progress.update("a", p)

    with caplog.at_level("INFO", logger="compare"):
        log = c.run_logged([sys.executable, "-c", script], tmp_path / "train.log", on_progress=on_progress, poll=0.2)
    assert "num_updates=125" in log and seen and seen[-1]["projected_seconds"] == 235.0
    doc = json.loads((tmp_path / "progress.json").read_text())
    # b has not started: it counts as long as a
    assert doc["status"] == "projection" and doc["train_seconds_all_systems"] == 470.0
    assert doc["jobs"] == 2 and doc["wall_seconds_all_systems"] == 235.0  # two systems at a time
    assert "all 2 systems: 7.8 min of training, about 3.9 min of wall time 2 at a time (projection)" in caplog.text
    assert doc["systems"]["a"]["status"] == "projection"
    assert "a: projected time for 1000 updates: 3.9 min (projection: 0.2 s/update measured over updates 25-125)" \
        in caplog.text
    progress.update("a", {"status": "measured", "seconds": 250.0})
    progress.update("b", {"status": "measured", "seconds": 230.0})
    doc = json.loads((tmp_path / "progress.json").read_text())
    assert doc["status"] == "measured" and doc["train_seconds_all_systems"] == 480.0


def test_train_records_its_first_projection_next_to_the_measured_time(monkeypatch, tmp_path):
    """train() wiring: a stand-in fairseq-train writes train_inner lines; the projection made while it ran is kept
    in DONE (and results.json) next to the measured time, and progress.json ends measured."""
    c = compare_module()
    args = c.parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "exp"), "--preset", "smoke",
                         "--max-update", "1000"])
    lines = [train_line(25, 40), train_line(125, 60), train_line(225, 80)]
    script = "; ".join(["import time"] + [f"print({line!r}, flush=True); time.sleep(0.5)" for line in lines])
    monkeypatch.setattr(c, "train_cmd", lambda args, arch, save_dir: [sys.executable, "-c", script])
    monkeypatch.setattr(c, "PROGRESS_POLL_SECONDS", 0.2)
    progress = c.Progress(tmp_path / "exp", ["s2t_smoe_base"], 1000)
    info = c.train(args, "s2t_smoe_base", tmp_path / "exp" / "s2t_smoe_base", progress)
    assert info["time_projection"]["measured_over_updates"] == [25, 125]  # the first one made
    assert info["time_projection"]["projected_seconds"] == 235.0 and info["train_seconds"] >= 1.0
    assert json.loads((tmp_path / "exp" / "s2t_smoe_base" / "DONE").read_text()) == info
    doc = json.loads((tmp_path / "exp" / "progress.json").read_text())
    assert doc["status"] == "measured" and doc["systems"]["s2t_smoe_base"] == {"status": "measured",
                                                                              "seconds": info["train_seconds"]}


# --- the score tables are a function of results.json ---

RESULTS = REPO / "examples" / "demo" / "results"
# pairs whose .md starts with a note added by hand (an HTML comment line) above what the table code wrote
ANNOTATED = {"quick_2cpu_build1", "quick_2cpu_cleanclone"}


# the quick demo's results (quick_*); the seeded study's (study_*) are report.py's, tested in test_study_seeded.py
@pytest.mark.parametrize("name", sorted(p.stem for p in RESULTS.glob("quick_*.json")))
def test_committed_results_regenerate_identically(name, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.study.compare", "--tables-from",
                           str(RESULTS / f"{name}.json"), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    committed = (RESULTS / f"{name}.md").read_bytes()
    if name in ANNOTATED:
        note, committed = committed.split(b"\n", 1)
        assert note.startswith(b"<!-- ") and note.endswith(b" -->")
    assert (tmp_path / "results.md").read_bytes() == committed
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000


def test_tables_from_the_run_s_results_json_are_the_run_s_tables(demo, tmp_path):
    _, out, _ = demo
    results = json.loads((out / "results.json").read_text())
    assert results["beam"] == 1 and "average_last" not in results  # compare.py alone: checkpoint_best.pt
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.study.compare", "--tables-from",
                           str(out / "results.json"), "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "results.md").read_bytes() == (out / "results.md").read_bytes()
    assert (tmp_path / "results.png").read_bytes() == (out / "results.png").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.study.compare", "--tables-from",
                           str(tmp_path / "none.json"), "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode != 0 and f"--tables-from {tmp_path / 'none.json'}: no such file" in proc.stderr


def test_checkpoints_saved_for_averaging(tmp_path):
    """Without --average-last the training command is the one earlier runs recorded in their DONE files (so their
    results are reused); with it the last K checkpoints are kept, and saving starts K-1 intervals before the end
    where validation runs only at the end."""
    c = compare_module()
    data, out = tmp_path / "data", tmp_path / "exp"

    def flags(*extra):
        args = c.parse_args(["--data", str(data), "--out", str(out), *extra])
        cmd = c.train_cmd(args, "s2t_dec_smoe", out / "x")
        i = cmd.index("--validate-interval-updates")
        return cmd[i:cmd.index("--no-epoch-checkpoints")]

    assert flags("--preset", "quick") == ["--validate-interval-updates", "4000", "--save-interval-updates", "4000",
                                          "--keep-interval-updates", "1"]
    assert flags("--preset", "quick", "--average-last", "5") == [
        "--validate-interval-updates", "4000", "--save-interval-updates", "100", "--keep-interval-updates", "5",
        "--validate-after-updates", "3600"]
    # full: validation every 2000 updates already saves there; the last 5 of those are kept
    assert flags("--preset", "full", "--average-last", "5") == [
        "--validate-interval-updates", "2000", "--save-interval-updates", "2000", "--keep-interval-updates", "5"]
    with pytest.raises(SystemExit, match="training saves only 40 checkpoints in 4000 updates"):
        flags("--preset", "quick", "--average-last", "50")
    with pytest.raises(SystemExit, match="--steps train,score: choose from train,average,decode,table"):
        flags("--steps", "train,score")


def test_the_averaged_checkpoints_include_the_last_where_an_epoch_ended(tmp_path):
    """fairseq writes no checkpoint_<epoch>_<update>.pt where a save interval ends an epoch: checkpoint_last.pt
    stands for the final update then."""
    c = compare_module()
    args = c.parse_args(["--data", str(tmp_path), "--out", str(tmp_path), "--preset", "smoke", "--average-last", "3"])
    for name in ("checkpoint_1_1.pt", "checkpoint_2_3.pt", "checkpoint_1_2.pt", "checkpoint_last.pt",
                 "checkpoint_best.pt", "checkpoint10.pt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in c.average_inputs(args, tmp_path, 4)] == ["checkpoint_last.pt", "checkpoint_2_3.pt",
                                                                      "checkpoint_1_2.pt"]
    (tmp_path / "checkpoint_2_4.pt").write_bytes(b"")
    assert [p.name for p in c.average_inputs(args, tmp_path, 4)] == ["checkpoint_2_4.pt", "checkpoint_2_3.pt",
                                                                      "checkpoint_1_2.pt"]
