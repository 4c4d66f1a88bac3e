"""``python -m fairseq_smoe.cli.transcribe``: files, folders and lists in; TSV / JSON lines out; bad files reported
while the rest are decoded; exit status; resuming an interrupted output (torn last line included)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from hub_model import BEAM, MAX_LEN_B, manifest_rows

from fairseq_smoe.cli import transcribe as cli

COMMON = ["--beam", str(BEAM), "--max-len-b", str(MAX_LEN_B), "--cpu", "--no-progress"]


@pytest.fixture
def inputs(trained, tmp_path):
    """A folder tree with the NB and WB test files (and a text file to ignore), a broken wav among them."""
    data = trained["corpus"]
    root = tmp_path / "audio"
    files = {}
    for subset in ("test_asr_wb", "test_asr_nb"):
        for r in manifest_rows(data, subset):
            dst = root / r["bandwidth"] / Path(r["audio"]).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data / r["audio"], dst)
            files[f"{r['bandwidth']}/{dst.stem}"] = dst
    (root / "wb" / "notes.txt").write_text("not audio")
    broken = root / "nb" / "zz_broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    return root, files, broken


def read_tsv(path: Path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_folder_with_a_bad_file_and_a_missing_one(trained, hub, inputs, tmp_path, capsys):
    root, files, broken = inputs
    missing = tmp_path / "missing.wav"
    out = tmp_path / "out.tsv"
    rc = cli.main([str(trained["model"]), str(root), str(missing), "--lang", "en", "-o", str(out), *COMMON])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{broken}: cannot decode audio" in err and f"{missing}: file not found" in err
    assert "2 of 10 files failed" in err
    rows = read_tsv(out)
    assert [r["id"] for r in rows] == sorted(files)  # folder order, the bad ones left out (a rerun retries them)
    want = hub.transcribe([files[r["id"]] for r in rows], beam=BEAM, max_len_b=MAX_LEN_B)
    for r, w in zip(rows, want):
        assert r["path"] == str(files[r["id"]])
        assert (r["bandwidth"], r["task"], r["language"]) == (r["id"].split("/")[0], "asr", "en")
        assert r["text"] == w.text and r["segments"] == ""


def test_resume_skips_done_ids_and_repairs_a_torn_line(trained, inputs, tmp_path, capsys):
    root, files, broken = inputs
    broken.unlink()
    out = tmp_path / "out.tsv"
    assert cli.main([str(trained["model"]), str(root), "--lang", "en", "-o", str(out), *COMMON]) == 0
    full = out.read_text(encoding="utf-8")
    lines = full.splitlines(keepends=True)
    assert len(lines) == 1 + len(files)
    # an interrupted run: header, three rows, and half of the fourth
    out.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2], encoding="utf-8")
    capsys.readouterr()
    assert cli.main([str(trained["model"]), str(root), "--lang", "en", "-o", str(out), *COMMON]) == 0
    err = capsys.readouterr().err
    assert "torn last line" in err and "3 of 8 files already done" in err
    assert out.read_text(encoding="utf-8") == full  # same rows, each once, same order
    # nothing left to do: the output is left as it is
    assert cli.main([str(trained["model"]), str(root), "--lang", "en", "-o", str(out), *COMMON]) == 0
    assert out.read_text(encoding="utf-8") == full


def test_list_file_jsonl_translation_and_a_long_recording(trained, hub, inputs, tmp_path):
    root, files, broken = inputs
    ids = sorted(files)[:2]
    long_wav = tmp_path / "meeting.flac"  # 40 s: 8 utterances separated by a second of digital silence
    pieces = []
    for f in sorted(files.values())[:8]:
        wav, sr = sf.read(f, dtype="float32")
        if sr != 16000:
            continue
        pieces += [np.zeros(16000, dtype=np.float32), np.trim_zeros(wav)]
    recording = np.concatenate(pieces + [np.zeros(40 * 16000 - sum(map(len, pieces)), dtype=np.float32)])
    sf.write(long_wav, recording, 16000)
    listing = tmp_path / "list.txt"
    listing.write_text("# id<TAB>path, or a path relative to this file\n"
                       + "".join(f"utt{i}\t{files[k]}\n" for i, k in enumerate(ids))
                       + f"{long_wav.name}\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    rc = cli.main([str(trained["model"]), "--list", str(listing), "--task", "st", "--lang", "es", "-o", str(out),
                   *COMMON])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["utt0", "utt1", "meeting"]
    want = hub.translate([files[k] for k in ids], beam=BEAM, max_len_b=MAX_LEN_B)
    assert [r["text"] for r in rows[:2]] == [w.text for w in want]
    assert all(r["task"] == "st" and r["language"] == "es" and r["segments"] is None for r in rows[:2])
    segments = rows[2]["segments"]
    assert len(segments) == len(pieces) // 2
    assert all(0 <= s["start"] < s["end"] <= 40.0 for s in segments)
    assert rows[2]["text"] == " ".join(s["text"] for s in segments if s["text"])


def test_usage_errors_exit_2(trained, tmp_path, capsys):
    model = str(trained["model"])
    assert cli.main([model, *COMMON]) == 2
    assert "no audio files" in capsys.readouterr().err
    wav = next((trained["corpus"] / "wav" / "16k").glob("*.wav"))
    assert cli.main([model, str(wav), "--lang", "fr", *COMMON]) == 2
    assert "<lang:fr> is not in the model's dictionary" in capsys.readouterr().err
    assert cli.main([model, str(wav), "--lang", "en", "--bandwidth", "swb", *COMMON]) == 2
    assert "--bandwidth swb" in capsys.readouterr().err
    other = tmp_path / "other.tsv"
    other.write_text("a\tb\n1\t2\n")
    assert cli.main([model, str(wav), "--lang", "en", "-o", str(other), *COMMON]) == 2
    assert "not a TSV written by this command" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "nomodel"), str(wav), *COMMON]) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert cli.main([model, "--bogus"]) == 2


def test_module_entry_point_with_progress_bar(trained, inputs, tmp_path):
    root, files, broken = inputs
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_smoe.cli.transcribe", str(trained["model"]), str(root / "wb"),
         "--lang", "en", "--beam", str(BEAM), "--max-len-b", str(MAX_LEN_B), "--cpu"],
        cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split("\t") == list(cli.TSV_COLUMNS)
    assert len(lines) == 5 and all(line.split("\t")[2] == "wb" for line in lines[1:])
    assert "4/4" in proc.stderr  # tqdm's bar
