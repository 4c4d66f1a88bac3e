"""Every kind of bad input gets an error naming the manifest, row and file, from the dataset (training and decoding)
and from ``python -m fairseq_smoe.cli.validate`` (which lists them all in one pass); ``--skip-bad-samples`` skips, counts
and reports instead, and the default stops."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fairseq_smoe.data.audio import AudioError, num_fbank_frames
from fairseq_smoe.data.config import ConfigError
from fairseq_smoe.data.manifest import ManifestError
from test_dataset import TEXT, make_task, write_corpus

REPO = Path(__file__).resolve().parents[1]
HEADER = ["id", "audio", "n_frames", "tgt_text", "speaker", "task", "src_lang", "tgt_lang", "bandwidth"]


def _noise(seconds, sr, channels=1, seed=0):
    x = 0.1 * np.random.default_rng(seed).standard_normal((int(seconds * sr), channels))
    return x.astype(np.float32)[:, 0] if channels == 1 else x.astype(np.float32)


def make_sources(root: Path) -> dict:
    """A good clip and one broken source of every kind; returns {name: (audio field, n_frames)}."""
    wav = root / "wav"
    wav.mkdir(parents=True, exist_ok=True)
    sf.write(wav / "good.wav", _noise(0.8, 16000), 16000)
    out = {"good": ("wav/good.wav", num_fbank_frames(int(0.8 * 16000)))}
    out["missing"] = ("wav/missing.wav", 80)
    (wav / "garbage.wav").write_bytes(os.urandom(2000))
    out["garbage"] = ("wav/garbage.wav", 80)
    full = (wav / "good.wav").read_bytes()
    (wav / "truncated.wav").write_bytes(full[: len(full) // 2])  # header still claims the full length
    out["truncated"] = ("wav/truncated.wav", out["good"][1])
    sf.write(wav / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    out["empty"] = ("wav/empty.wav", 1)
    sf.write(wav / "short.wav", _noise(0.01, 16000), 16000)
    out["short"] = ("wav/short.wav", 1)
    sf.write(wav / "stereo.wav", _noise(0.5, 16000, channels=2), 16000)
    out["stereo"] = ("wav/stereo.wav", 48)
    sf.write(wav / "rate4k.wav", _noise(0.5, 4000), 4000)
    out["rate4k"] = ("wav/rate4k.wav", 48)
    sf.write(wav / "rate96k.wav", _noise(0.5, 96000), 96000)
    out["rate96k"] = ("wav/rate96k.wav", 48)
    nan = _noise(0.5, 16000)
    nan[100] = np.nan
    sf.write(wav / "nan.wav", nan, 16000, subtype="FLOAT")
    out["nan_wav"] = ("wav/nan.wav", 48)
    feats = np.random.default_rng(0).standard_normal((50, 80)).astype(np.float32)
    feats[7, 3] = np.nan
    np.save(wav / "nan.npy", feats)
    out["nan_npy"] = ("wav/nan.npy", 50)
    feats[7, 3] = np.inf
    np.save(wav / "inf.npy", feats)
    out["inf_npy"] = ("wav/inf.npy", 50)
    return out


# name -> (manifest fields that differ from a good row, message the error must contain)
AUDIO_CASES = {
    "missing": ("missing.wav: file not found", False),
    "garbage": ("garbage.wav: cannot decode audio", True),
    "truncated": ("fbank frames, but the manifest says n_frames=78: truncated or replaced file?", True),
    "empty": ("empty.wav: no samples", True),
    "short": ("short.wav: 10.0 ms, shorter than one 25 ms analysis window", True),
    "stereo": ("stereo.wav: 2 channels; S-MoE expects mono audio", True),
    "rate4k": ("rate4k.wav: sample rate 4000 Hz outside the supported 8000-48000 Hz", True),
    "rate96k": ("rate96k.wav: sample rate 96000 Hz outside the supported 8000-48000 Hz", True),
    "nan_wav": ("nan.wav: samples contain NaN or inf", True),
    "nan_npy": ("nan.npy: features contain NaN or inf", True),
    "inf_npy": ("inf.npy: features contain NaN or inf", True),
}
ROW_CASES = {
    "unknown_task": ({"task": "summarize"}, "unknown task 'summarize'; expected one of ['asr', 'st']"),
    "unknown_bandwidth": ({"bandwidth": "swb"}, "bandwidth 'swb' has no encoder route; routes are ['wb', 'nb']"),
    "lang_not_in_dict": ({"task": "st", "tgt_lang": "fr"}, "guiding token <lang:fr> is not in the dictionary"),
    "empty_target": ({"tgt_text": "   "}, "empty tgt_text"),
    "bad_n_frames": ({"n_frames": "lots"}, "n_frames 'lots' is not an integer"),
    "duplicate_id": ({"id": "ok0"}, "duplicate id, first seen at "),
}


def row(uid, field, frames, **kw):
    r = {"id": uid, "audio": field, "n_frames": str(frames), "tgt_text": TEXT["en"][0], "speaker": "spk",
         "task": "asr", "src_lang": "en", "tgt_lang": "en", "bandwidth": "wb"}
    r.update(kw)
    if r["task"] == "st" and "tgt_text" not in kw:
        r["tgt_text"] = TEXT["es"][0]
    return r


def write_manifest(path: Path, rows, header=HEADER):
    lines = ["\t".join(header)] + ["\t".join(r.get(c, "") for c in header) for r in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    write_corpus(root, [("seed", 0.5, 16000, "asr", "en", TEXT["en"][0])])  # vocab + config.yaml
    return root, make_sources(root)


def good_rows(sources, n=2):
    return [row(f"ok{i}", *sources["good"]) for i in range(n)]


def load_all(root, split="train", *extra):
    """Load a split and read every sample, as training does."""
    task = make_task(root, *extra)
    task.load_dataset(split)
    ds = task.datasets[split]
    return ds, [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("case", sorted(AUDIO_CASES))
def test_bad_audio_stops_with_the_row_and_file(data, case):
    root, sources = data
    message, at_read_time = AUDIO_CASES[case]
    write_manifest(root / f"a_{case}.tsv", good_rows(sources) + [row("bad", *sources[case])])
    error = AudioError if at_read_time else ManifestError
    with pytest.raises(error) as e:
        load_all(root, f"a_{case}")
    text = str(e.value)
    assert f"a_{case}.tsv:4 (id 'bad')" in text and message in text, text
    if at_read_time:
        assert "--skip-bad-samples" in text


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_bad_rows_stop_at_load_with_the_row(data, case):
    root, sources = data
    fields, message = ROW_CASES[case]
    write_manifest(root / f"r_{case}.tsv", good_rows(sources) + [row("bad", *sources["good"], **fields)])
    with pytest.raises(ManifestError) as e:
        make_task(root).load_dataset(f"r_{case}")
    uid = fields.get("id", "bad")
    assert f"r_{case}.tsv:4 (id '{uid}')" in str(e.value) and message in str(e.value), str(e.value)
    if case == "duplicate_id":
        assert f"first seen at {root / f'r_{case}.tsv'}:2" in str(e.value)


def test_missing_column_names_the_manifest_and_column(data):
    root, sources = data
    write_manifest(root / "nocol.tsv", good_rows(sources), header=[c for c in HEADER if c != "task"])
    with pytest.raises(ManifestError, match=re.escape(f"{root / 'nocol.tsv'}: missing column(s) ['task']")):
        make_task(root).load_dataset("nocol")


def test_ragged_row_names_the_line(data):
    root, sources = data
    write_manifest(root / "ragged.tsv", good_rows(sources))
    with open(root / "ragged.tsv", "a") as f:
        f.write("short\trow\n")
    with pytest.raises(ManifestError, match=re.escape(f"{root / 'ragged.tsv'}:4: wrong number of fields")):
        make_task(root).load_dataset("ragged")


@pytest.mark.parametrize("smoe,message", [
    ({"homogenous_batches": True}, "unknown key(s) under 'smoe': ['homogenous_batches']"),
    ({"spectral_threshold_db": "-50"}, "smoe.spectral_threshold_db must be a number, got '-50'"),
    ({"encoder_routes": ["wb", "wb"]}, "smoe.encoder_routes names a route twice"),
])
def test_bad_config_names_the_file_and_key(tmp_path, smoe, message):
    write_corpus(tmp_path, [("a", 0.5, 16000, "asr", "en", "x")], config_extra={"smoe": smoe})
    with pytest.raises(ConfigError) as e:
        make_task(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'config.yaml'}: ") and message in str(e.value)


def test_skip_bad_samples_skips_counts_and_keeps_the_rest(data, caplog):
    root, sources = data
    rows = good_rows(sources, 3)
    rows += [row(f"a_{case}", *sources[case]) for case in sorted(AUDIO_CASES)]
    rows += [row(f"r_{case}", *sources["good"], **{k: v for k, v in ROW_CASES[case][0].items() if k != "id"})
             for case in sorted(ROW_CASES) if case != "duplicate_id"]
    write_manifest(root / "mixed.tsv", rows)
    with pytest.raises(ManifestError):
        make_task(root).load_dataset("mixed")  # the default stops

    ds, items = load_all(root, "mixed", "--skip-bad-samples")
    n_row_problems = len(ROW_CASES) - 1 + 1  # the 5 bad fields, and the missing file found at load
    assert len(ds) == len(rows) - n_row_problems
    assert f"{root / 'mixed.tsv'}: skipped {n_row_problems} of {len(rows)} rows (--skip-bad-samples)" in caplog.text
    kept = {ds.ids[i] for i, it in enumerate(items) if it is not None}
    assert kept == {"ok0", "ok1", "ok2"}
    for case in AUDIO_CASES:
        if case != "missing":
            assert re.search(rf"skipped .*mixed.tsv:\d+ \(id 'a_{case}'\)", caplog.text), case
    batch = ds.collater(items)
    assert batch["n_skipped"] == len(AUDIO_CASES) - 1 and batch["nsentences"] == 3
    assert batch["net_input"]["encoder_route_ids"].tolist() == [0, 0, 0]
    assert ds.collater([None, None]) == {}


def run_validate(*args):
    return subprocess.run([sys.executable, "-m", "fairseq_smoe.cli.validate", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_validate_lists_every_problem_in_one_pass(data):
    root, sources = data
    rows = good_rows(sources)
    rows += [row(f"a_{case}", *sources[case]) for case in sorted(AUDIO_CASES)]
    rows += [row(f"r_{case}" if case != "duplicate_id" else "ok0", *sources["good"],
                 **{k: v for k, v in ROW_CASES[case][0].items() if k != "id"}) for case in sorted(ROW_CASES)]
    manifest = root / "all_bad.tsv"
    write_manifest(manifest, rows)

    quick = run_validate(manifest)
    assert quick.returncode == 1
    assert "missing.wav: file not found" in quick.stdout and "cannot decode" not in quick.stdout  # no decoding

    full = run_validate(manifest, "--check-audio")
    assert full.returncode == 1, full.stderr
    lines = full.stdout.splitlines()
    for i, r in enumerate(rows[2:], start=4):
        case = r["id"][2:] if r["id"] != "ok0" else "duplicate_id"
        message = AUDIO_CASES[case][0] if case in AUDIO_CASES else ROW_CASES[case][1]
        assert any(l.startswith(f"{manifest}:{i} (id '{r['id']}'): ") and message in l for l in lines), (case, lines)
    n_bad = len(rows) - 2
    assert f"{len(rows)} rows in 1 manifest(s): {n_bad} bad rows, {n_bad} problems" in full.stderr


def test_validate_passes_a_clean_manifest_and_rejects_bad_arguments(data, tmp_path):
    root, sources = data
    write_manifest(root / "clean.tsv", good_rows(sources, 3))
    ok = run_validate(root / "clean.tsv", "--check-audio")
    assert ok.returncode == 0 and ok.stdout == "" and "3 rows in 1 manifest(s): 0 bad rows, 0 problems" in ok.stderr
    missing_cfg = run_validate(root / "clean.tsv", "--config", tmp_path / "nope.yaml")
    assert missing_cfg.returncode == 2 and f"{tmp_path / 'nope.yaml'}: no such file" in missing_cfg.stderr
    no_manifest = run_validate(tmp_path / "nope.tsv")
    assert no_manifest.returncode == 1 and f"{tmp_path / 'nope.tsv'}: manifest not found" in no_manifest.stdout


def test_bad_audio_fails_fairseq_train_by_default_and_is_skipped_on_request(data, tmp_path):
    """Through fairseq-train: the default exits non-zero naming the row; --skip-bad-samples trains and logs the count."""
    root, sources = data
    rows = [row(f"ok{i}", *sources["good"], task=t, tgt_lang=l) for i, (t, l) in
            enumerate([("asr", "en"), ("st", "es")] * 3)]
    rows.append(row("broken", *sources["garbage"]))
    write_manifest(root / "train_bad.tsv", rows)
    write_manifest(root / "dev_ok.tsv", good_rows(sources, 2))
    cmd = [str(Path(sys.executable).parent / "fairseq-train"), str(root), "--user-dir", str(REPO / "fairseq_smoe"),
           "--config-yaml", "config.yaml", "--task", "speech_to_text_smoe", "--arch", "s2t_encdec_smoe_xs",
           "--encoder-layers", "1", "--decoder-layers", "1", "--train-subset", "train_bad", "--valid-subset",
           "dev_ok", "--criterion", "label_smoothed_cross_entropy", "--optimizer", "adam", "--lr", "1e-3",
           "--max-sentences", "8", "--max-update", "2", "--cpu", "--num-workers", "0", "--no-save",
           "--disable-validation", "--log-format", "simple", "--log-interval", "1", "--seed", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    failed = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert failed.returncode != 0
    assert f"{root / 'train_bad.tsv'}:8 (id 'broken')" in failed.stderr and "garbage.wav: cannot decode" in failed.stderr
    skipped = subprocess.run(cmd + ["--skip-bad-samples"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, env=env)
    log = skipped.stdout + skipped.stderr
    assert skipped.returncode == 0, log[-3000:]
    assert re.search(r"skipped .*train_bad.tsv:8 \(id 'broken'\): .*garbage.wav: cannot decode", log)
    counts = [int(float(x)) for x in re.findall(r"\bn_skipped=([\d.]+)", log)]
    assert counts and all(c == 1 for c in counts), log[-3000:]  # the interval's count, then the epoch total
