"""recipes/<corpus>/run.sh from corpus to score table, at smoke size, on each recipe's fixture corpus.

Each recipe runs its five numbered stages (prepare data, train, average the last 2 checkpoints, decode the test sets
with the average, score table) in a subprocess exactly as a user would. LibriSpeech trains all four systems and shows
the stage mechanics (--stage/--stop-stage, a rerun skipping everything, changed settings refused); MuST-C (three
decoder routes), CoVoST 2, the generic TSV recipe and the offline corpus train one or two systems each. The fixture
corpora are the recipe tests' own (tests/test_recipe_*.py, tests/test_offline_corpus.py).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from test_offline_corpus import build_fixture, prep_args
from test_recipe_covost2 import make_covost
from test_recipe_generic import make_folder
from test_recipe_librispeech import make_librispeech
from test_recipe_mustc import make_mustc

REPO = Path(__file__).resolve().parents[1]
ALL = ["s2t_smoe_base", "s2t_dec_ffnx2", "s2t_dec_smoe", "s2t_encdec_smoe"]
NAMES = {"s2t_smoe_base": "Base", "s2t_dec_ffnx2": "DecFFNx2", "s2t_dec_smoe": "DecS-MoE",
         "s2t_encdec_smoe": "EncDecS-MoE"}
needs_mp3 = pytest.mark.skipif("MP3" not in sf.available_formats(), reason="this libsndfile has no mp3 support")


def run_sh(corpus: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "recipes" / corpus / "run.sh"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=1800)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def check_results(exp: Path, data: Path, archs: list, test_sets: list) -> dict:
    """results.json/md of a smoke run: every system decoded every test set with the average of its last 2
    checkpoints (WER and joint CTC/attention for ASR, BLEU for ST), and the tables rebuild from results.json."""
    results = json.loads((exp / "results.json").read_text())
    assert list(results["systems"]) == [NAMES[a] for a in archs]
    assert results["average_last"] == 2 and results["save_every"] == 1 and results["preset"] == "smoke"
    for arch in archs:
        sysres = results["systems"][NAMES[arch]]
        assert sysres["updates"] == 4 and sorted(sysres["tests"]) == sorted(test_sets)
        # the average of the last 2: the mid-epoch checkpoint of update 3 and the last one (update 4)
        assert len(sysres["averaged"]) == 2 and (exp / arch / "checkpoint_avg2.pt").is_file()
        for subset, r in sysres["tests"].items():
            n_rows = len((data / f"{subset}.tsv").read_text().strip().splitlines()) - 1
            assert r["n"] == n_rows, (arch, subset)
            log = (exp / arch / "decode_avg2" / f"{subset}.log").read_text()
            assert f"--path {exp / arch / 'checkpoint_avg2.pt'}" in log.splitlines()[0]
            if "_asr_" in subset:
                assert r["metric"] == "WER" and r["score"] >= 0 and r["ctc"]["n"] == n_rows
                assert r["joint"]["ctc_decode_weight"] == 0.3 and r["joint"]["n"] == n_rows
            else:
                assert r["metric"] == "BLEU" and 0 <= r["score"] <= 100
    md = (exp / "results.md").read_text()
    assert "decoded with fairseq-generate, beam 1, the average of the last 2 checkpoints (1 updates apart)." in md
    for arch in archs:
        assert f"| {NAMES[arch]} |" in md
    # the score table again from results.json alone: byte for byte
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.study.compare", "--tables-from",
                           str(exp / "results.json"), "--out", str(exp / "again")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (exp / "again" / "results.md").read_bytes() == (exp / "results.md").read_bytes()
    assert (exp / "again" / "results.png").read_bytes() == (exp / "results.png").read_bytes()
    return results


def mtimes(exp: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in exp.rglob("*.pt")}


# --- LibriSpeech: all four systems, and the stages one by one ---

@pytest.fixture(scope="module")
def librispeech(tmp_path_factory, flite_cache):
    root = tmp_path_factory.mktemp("ls") / "LibriSpeech"
    make_librispeech(root, flite_cache)
    work = tmp_path_factory.mktemp("ls_run")
    data, exp = work / "data", work / "exp"
    # the fixture has no test split: dev-clean's NB slice is decoded as the test set
    args = ["--smoke", "--data", data, "--exp", exp, "--train-subset", "train-clean-100", "--valid-subset",
            "dev-clean", "--test-sets", "dev-clean_asr_en_nb", "--", "--librispeech-root", root, "--vocab-size", "60",
            "--workers", "2"]
    first = run_sh("librispeech", "--stop-stage", "2", *args)
    stage2 = {"done": sorted(p.parent.name for p in exp.glob("*/DONE")), "avg": sorted(exp.rglob("checkpoint_avg*")),
              "results": (exp / "results.json").exists(), "data": (data / "prep.json").exists()}
    rest = run_sh("librispeech", "--stage", "3", *args)
    return data, exp, args, first, stage2, rest


def test_librispeech_stage_1_2_then_3_to_5(librispeech):
    data, exp, _, first, stage2, rest = librispeech
    assert "[librispeech stage 1" in first.stdout and "[librispeech stage 2" in first.stdout
    assert "stage 3" not in first.stdout
    # after --stop-stage 2: data prepared and four systems trained, nothing averaged, decoded or tabulated
    assert stage2 == {"done": sorted(ALL), "avg": [], "results": False, "data": True}
    assert [f"[librispeech stage {n}" in rest.stdout for n in (1, 2, 3, 4, 5)] == [False, False, True, True, True]
    check_results(exp, data, ALL, ["dev-clean_asr_en_nb"])
    for arch in ALL:
        train_log = (exp / arch / "train.log").read_text().splitlines()[0]
        assert "--train-subset train-clean-100 --valid-subset dev-clean" in train_log
        assert "--save-interval-updates 1 --keep-interval-updates 2 --validate-after-updates 3" in train_log


def test_librispeech_rerun_skips_every_stage_and_changed_settings_are_refused(librispeech):
    data, exp, args, _, _, _ = librispeech
    before, results = mtimes(exp), json.loads((exp / "results.json").read_text())
    proc = run_sh("librispeech", *args)
    assert "fairseq-train ..." not in proc.stderr and "fairseq-generate ..." not in proc.stderr
    assert "checkpoint_avg2.log)" not in proc.stderr and ".ctc.log)" not in proc.stderr
    assert proc.stderr.count("trained already") == 4 * 4  # each of the stages 2-5, each system
    assert mtimes(exp) == before
    assert json.loads((exp / "results.json").read_text())["systems"] == results["systems"]
    # stage 5 alone rebuilds the table from the decoded results
    (exp / "results.md").unlink()
    run_sh("librispeech", "--stage", "5", *args)
    assert (exp / "results.md").exists()
    # averaging 3 instead of 2 needs other checkpoints kept: refused, naming the folder
    proc = run_sh("librispeech", "--stage", "2", "--stop-stage", "2", *args[:1], "--average", "3", *args[1:],
                  check=False)
    assert proc.returncode != 0 and "holds a system trained with other settings" in proc.stderr


def test_a_stage_whose_input_is_missing_names_the_stage_to_run(librispeech, tmp_path):
    data, _, args, _, _, _ = librispeech
    i = args.index("--exp")
    proc = run_sh("librispeech", "--stage", "4", "--systems", "s2t_dec_smoe",
                  *args[:i + 1], tmp_path / "fresh", *args[i + 2:], check=False)
    assert proc.returncode != 0
    assert f"{tmp_path / 'fresh' / 's2t_dec_smoe'}: not trained yet (no DONE file): run the train step first" \
        in proc.stderr


# --- the other public corpora: one system each ---

def test_mustc_three_decoder_routes(tmp_path, flite_cache):
    root = tmp_path / "MUSTC_v1.0"
    make_mustc(root, flite_cache)
    data, exp = tmp_path / "data", tmp_path / "exp"
    sets = ["tst-COMMON_asr_en_nb", "tst-COMMON_st_de_wb"]
    run_sh("mustc", "--smoke", "--data", data, "--exp", exp, "--systems", "s2t_encdec_smoe", "--valid-subset",
           "tst-COMMON", "--test-sets", ",".join(sets), "--", "--mustc-root", root, "--langs", "de,es", "--splits",
           "train,tst-COMMON", "--vocab-size", "80", "--decoder-routes", "transcribe,translate:de,translate:es",
           "--workers", "2")
    results = check_results(exp, data, ["s2t_encdec_smoe"], sets)
    md = (exp / "results.md").read_text()
    assert "| system | params total / active (M) | tst-COMMON en NB |" in md
    assert "| system | params total / active (M) | tst-COMMON de WB |" in md
    assert results["systems"]["EncDecS-MoE"]["params"]["total_M"] > results["systems"]["EncDecS-MoE"]["params"][
        "active_M"]


@needs_mp3
def test_covost2(tmp_path, flite_cache):
    cv = tmp_path / "cv-corpus-4" / "en"
    make_covost(cv, flite_cache)
    data, exp = tmp_path / "data", tmp_path / "exp"
    sets = ["test_asr_en_wb", "test_st_de_nb"]
    run_sh("covost2", "--smoke", "--data", data, "--exp", exp, "--systems", "s2t_dec_smoe", "--test-sets",
           ",".join(sets), "--", "--cv-root", cv, "--tgt-lang", "de", "--vocab-size", "400", "--vocab-type", "bpe",
           "--byte-fallback", "--workers", "2")
    check_results(exp, data, ["s2t_dec_smoe"], sets)


@needs_mp3
def test_generic(tmp_path, flite_cache):
    make_folder(tmp_path / "corpus", flite_cache)
    data, exp = tmp_path / "data", tmp_path / "exp"
    run_sh("generic", "--smoke", "--data", data, "--exp", exp, "--systems", "s2t_smoe_base", "--valid-subset", "test",
           "--", "--tsv", tmp_path / "corpus" / "corpus.tsv", "--vocab-size", "90", "--audio-format", "flac",
           "--workers", "2")
    sets = sorted(p.stem for p in data.glob("test_*.tsv"))  # the recipe's default: every test slice
    assert any("_asr_" in s for s in sets) and any("_st_" in s for s in sets)
    check_results(exp, data, ["s2t_smoe_base"], sets)


# --- the offline corpus (the demo's recipe) ---

def test_offline_recipe(tmp_path):
    fixture = build_fixture(tmp_path / "debian")
    data, exp = tmp_path / "data", tmp_path / "exp"
    sets = ["test_real_asr_nb", "test_real_es_st_nb"]
    proc = run_sh("offline", "--smoke", "--data", data, "--exp", exp, "--systems", "s2t_smoe_base,s2t_dec_smoe",
                  "--test-sets", ",".join(sets), "--", *prep_args(fixture, data)[2:])
    assert "[offline stage 5" in proc.stdout
    check_results(exp, data, ["s2t_smoe_base", "s2t_dec_smoe"], sets)


# --- defaults, without running anything ---

def test_defaults_are_the_gpu_settings_and_smoke_is_the_cpu(tmp_path):
    proc = run_sh("mustc", "--dry-run", "--data", tmp_path / "d", "--exp", tmp_path / "e", "--", "--mustc-root", "/m")
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("[")]
    assert lines[0] == f"bash {REPO}/recipes/mustc/prep.sh --out-dir {tmp_path / 'd'} --mustc-root /m "
    steps = [re.search(r"--steps (\w+)", line).group(1) for line in lines[1:]]
    assert steps == ["train", "average", "decode", "table"]
    for line in lines[1:]:  # the full preset (mixed precision, min(8, cores) workers), on the GPU, averaging 10
        assert "--preset full" in line and "--average-last 10" in line and "--cpu" not in line
        assert "--test-sets tst-COMMON_\\*" in line
    proc = run_sh("mustc", "--dry-run", "--smoke", "--stage", "2", "--data", tmp_path / "d", "--exp", tmp_path / "e")
    assert "prep.sh" not in proc.stdout
    assert all("--preset smoke" in line and "--cpu" in line and "--average-last 2 --save-every 1" in line
               for line in proc.stdout.splitlines() if not line.startswith("["))
    # the demo: quick preset, the average of the last 5, its own data and exp folders
    proc = run_sh("offline", "--dry-run", "--data", "data/offline_quick", "--exp", "exp/demo_quick")
    assert "recipes/offline/prep.sh --out-dir data/offline_quick --mode quick" in proc.stdout
    assert "--preset quick" in proc.stdout and "--average-last 5" in proc.stdout
    # run_demo.sh passes no folders: the recipe's defaults are the demo's, so a later run.sh finds the demo's run
    proc = run_sh("offline", "--dry-run", "--stage", "2", "--stop-stage", "2")
    assert f"--data {REPO}/data/offline_quick --out {REPO}/exp/demo_quick --preset quick" in proc.stdout
    proc = run_sh("mustc", "--stage", "x", check=False)
    assert proc.returncode == 2 and "--stage x: not a number" in proc.stderr
    proc = run_sh("mustc", "--mustc-root", "/m", check=False)
    assert proc.returncode == 2 and "unknown option --mustc-root (prep options go after --" in proc.stderr
