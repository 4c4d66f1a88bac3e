"""recipes/mustc/prep.sh on a tiny MuST-C built in the real layout: en-<lang>/data/<split>/{wav/<talk>.wav,
txt/<split>.yaml, txt/<split>.en, txt/<split>.<lang>}, segments cut out of whole talks by offset/duration."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fairseq_smoe.prep import mustc
import yaml
from recipe_helpers import (LANG_COLUMN, REPO, SENTENCES, check_frames_and_routes, load_split, manifests, read_rows,
                            run_recipe, say, train_step, tree_state, validate)

# split -> talk -> (speaker, flite voice, sentence indices)
TALKS = {
    "train": {"ted_1": ("spk.1", "slt", [0, 1, 2]), "ted_2": ("spk.2", "rms", [3, 4, 5])},
    "tst-COMMON": {"ted_9": ("spk.9", "awb", [6, 7])},
}
GAP_S = 0.35  # silence between segments, as in a talk


def make_mustc(root: Path, cache: Path, langs=("de", "es")) -> dict:
    """Write the corpus; returns {(lang, split): [(talk, offset_samples, samples, sentence index)]}."""
    layout = {}
    for lang in langs:
        for split, talks in TALKS.items():
            base = root / f"en-{lang}" / "data" / split
            (base / "wav").mkdir(parents=True)
            (base / "txt").mkdir()
            yaml_lines, en, tgt, segs = [], [], [], []
            for talk, (spk, voice, idx) in talks.items():
                gap = np.zeros(int(GAP_S * 16000), np.float32)
                parts, pos = [gap], len(gap)
                for i in idx:
                    speech = say(SENTENCES[i][0], voice, cache)
                    yaml_lines.append(f"- {{duration: {len(speech) / 16000:.6f}, offset: {pos / 16000:.6f}, "
                                      f"rel_path: {split}/wav/{talk}.wav, speaker_id: {spk}, wav: {talk}.wav}}")
                    en.append(SENTENCES[i][0])
                    tgt.append(SENTENCES[i][LANG_COLUMN[lang]])
                    segs.append((talk, pos, len(speech), i))
                    parts += [speech, gap]
                    pos += len(speech) + len(gap)
                sf.write(base / "wav" / f"{talk}.wav", np.concatenate(parts), 16000, subtype="PCM_16")
            (base / "txt" / f"{split}.yaml").write_text("\n".join(yaml_lines) + "\n")
            (base / "txt" / f"{split}.en").write_text("\n".join(en) + "\n")
            (base / "txt" / f"{split}.{lang}").write_text("\n".join(tgt) + "\n")
            layout[lang, split] = segs
    return layout


@pytest.fixture(scope="module")
def mustc_corpus(tmp_path_factory, flite_cache):
    root = tmp_path_factory.mktemp("mustc") / "MUSTC_v1.0"
    return root, make_mustc(root, flite_cache)


ARGS = ["--langs", "de,es", "--splits", "train,tst-COMMON", "--vocab-size", "80",
        "--decoder-routes", "transcribe,translate:de,translate:es", "--workers", "2"]


@pytest.fixture(scope="module")
def prepared(mustc_corpus, tmp_path_factory):
    root, layout = mustc_corpus
    out = tmp_path_factory.mktemp("mustc_out")
    res = run_recipe("mustc", "--mustc-root", root, "--out-dir", out, *ARGS)
    return out, layout, res


def test_manifests_rows_and_segments(prepared, mustc_corpus):
    out, layout, res = prepared
    root = mustc_corpus[0]
    m = manifests(out)
    slices = [f"{s}_{t}_{bw}" for s in ("train", "tst-COMMON") for t in ("asr_en", "st_de", "st_es")
              for bw in ("nb", "wb")]
    assert sorted(m) == sorted(slices + ["train", "tst-COMMON"])
    # English ASR from the first pair only; ST per pair; every row twice (wb + nb)
    assert len(m["train"]) == 6 * 3 * 2 and len(m["tst-COMMON"]) == 2 * 3 * 2
    assert {len(m[s]) for s in slices} == {6, 2} and all(len(m[s]) == 6 for s in slices if s.startswith("train"))
    for (lang, split), segs in layout.items():
        seen = Counter()
        for talk, pos, length, i in segs:
            n = seen[talk]  # fairseq's ids: segments of a talk counted in offset order
            seen[talk] += 1
            uid = f"en-{lang}_{talk}_{n}"
            st = {r["id"]: r for r in m[f"{split}_st_{lang}_wb"]}[f"{uid}_st_{lang}_wb"]
            assert st["tgt_text"] == SENTENCES[i][LANG_COLUMN[lang]] and st["speaker"].startswith("spk.")
            assert (st["task"], st["src_lang"], st["tgt_lang"], st["bandwidth"]) == ("st", "en", lang, "wb")
            # the WB segment is exactly the talk's samples; the NB copy is its 8 kHz telephone version
            talk_wav, _ = sf.read(root / f"en-{lang}" / "data" / split / "wav" / f"{talk}.wav", dtype="int16")
            seg, sr = sf.read(out / st["audio"], dtype="int16")
            assert sr == 16000 and np.array_equal(seg, talk_wav[pos:pos + length])
            nb = {r["id"]: r for r in m[f"{split}_st_{lang}_nb"]}[f"{uid}_st_{lang}_nb"]
            info = sf.info(str(out / nb["audio"]))
            assert info.samplerate == 8000 and info.frames == length // 2
            assert nb["audio"] == f"audio/{split}/nb/en-{lang}_{talk}/{uid}.wav"
    asr = m["train_asr_en_wb"]
    assert [r["tgt_text"] for r in asr] == [SENTENCES[i][0] for i in range(6)]
    assert all(r["id"].startswith("en-de_") for r in m["train_asr_en_nb"])
    summary = json.loads((out / "prep.json").read_text())
    assert summary["manifests"]["train"]["rows"] == 36 and summary["langs"] == ["de", "en", "es"]
    assert "audio: 16 done in" in res.stderr  # progress: (6 + 2 segments) x 2 pairs


def test_data_dir_loads_with_real_frame_counts(prepared):
    out = prepared[0]
    assert check_frames_and_routes(out, "train") == 36
    # one ST expert per language, as --decoder-routes asked
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["smoe"]["decoder_routes"] == ["transcribe", "translate:de", "translate:es"]
    _, ds = load_split(out, "train")
    want = {"en": 0, "de": 1, "es": 2}
    assert ds.decoder_routes.tolist() == [want[r["tgt_lang"]] for r in read_rows(out / "train.tsv")]
    # the model trains on it: a finite loss, and every expert (wb/nb encoder, 3 decoder) receives a gradient
    loss, used = train_step(out, "train")
    assert 0 < loss < 20 and used and all(all(layer) for layer in used)
    assert {len(layer) for layer in used} == {2, 3}
    assert check_frames_and_routes(out, "tst-COMMON") == 12
    assert validate(out) == 0


IN_PROCESS_ARGS = ARGS[:-1] + ["1"]  # one worker: no process pool forked from pytest


def test_rerun_skips_finished_work(prepared, mustc_corpus, caplog):
    out = prepared[0]
    before = tree_state(out)
    manifests_before = {p.name: p.read_bytes() for p in out.glob("*.tsv")}
    caplog.set_level("INFO")
    assert mustc.main(["--mustc-root", str(mustc_corpus[0]), "--out-dir", str(out), *IN_PROCESS_ARGS]) == 0
    assert "spm.model exists, kept" in caplog.text
    after = tree_state(out)
    audio_files = [k for k in before if k.startswith("audio/")]
    assert len(audio_files) == 32 and all(after[k] == before[k] for k in audio_files)
    assert {p.name: p.read_bytes() for p in out.glob("*.tsv")} == manifests_before


@pytest.mark.parametrize("sig,exit_code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)],
                         ids=["SIGKILL", "SIGINT"])
def test_interrupted_run_leaves_no_half_written_output_and_resumes(mustc_corpus, prepared, tmp_path, sig, exit_code):
    """Kill (SIGKILL) or Ctrl-C (SIGINT) the recipe while it writes audio: no manifest or config exists, every
    audio file present is complete, and a rerun finishes with exactly the files of an uninterrupted run."""
    root = mustc_corpus[0]
    out = tmp_path / "out"
    cmd = ["bash", str(REPO / "recipes/mustc/prep.sh"), "--mustc-root", str(root), "--out-dir", str(out), *ARGS[:-2],
           "--workers", "1"]
    with open(tmp_path / "stderr", "w") as err:
        # SIGINT as at a terminal: a shell starts background jobs with it ignored, and Python keeps it so
        proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHON=sys.executable), stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / "audio").exists() and len(list((out / "audio").rglob("*.wav"))) >= 3:
                os.killpg(proc.pid, sig)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    assert proc.returncode == exit_code, "the recipe finished before it could be interrupted"
    if sig == signal.SIGINT:
        assert "interrupted: finished audio in" in (tmp_path / "stderr").read_text()
    written = [p for p in (out / "audio").rglob("*") if p.is_file()]
    finished = [p for p in written if p.suffix == ".wav"]
    assert 3 <= len(finished) < 32
    assert not list(out.glob("*.tsv")) and not (out / "config.yaml").exists() and not (out / "spm.model").exists()
    clean = prepared[0]
    for p in finished:  # complete files only: byte for byte what the uninterrupted run wrote
        assert p.read_bytes() == (clean / p.relative_to(out)).read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in finished}
    assert mustc.main(["--mustc-root", str(root), "--out-dir", str(out), *IN_PROCESS_ARGS]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # finished work was kept
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary files left
    for p in clean.glob("*.tsv"):
        assert (out / p.name).read_text() == p.read_text()
    for p in clean.rglob("*.wav"):
        assert (out / p.relative_to(clean)).read_bytes() == p.read_bytes()


def _corpus_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage,message", [
    (lambda r: (r / "en-de/data/train/wav/ted_2.wav").unlink(),
     r"train\.yaml entry 4: audio file .*ted_2\.wav not found"),
    (lambda r: (r / "en-de/data/train/txt/train.yaml").write_text("- {duration: 1.0, offset: [\n"),
     r"train\.yaml: not valid YAML"),
    (lambda r: (r / "en-de/data/train/txt/train.yaml").write_text(
        (r / "en-de/data/train/txt/train.yaml").read_text().replace("offset: 0.350000", "offset: soon", 1)),
     r"train\.yaml entry 1: offset 'soon' is not a number"),
    (lambda r: (r / "en-de/data/train/txt/train.yaml").write_text(
        (r / "en-de/data/train/txt/train.yaml").read_text().replace("duration:", "length:", 1)),
     r"train\.yaml entry 1: a segment needs \['duration', 'offset', 'wav'\]"),
    (lambda r: (r / "en-de/data/train/txt/train.de").write_text("nur eine zeile\n"),
     r"train\.de: 1 lines, but .*train\.yaml lists 6 segments"),
    (lambda r: (r / "en-de/data/train/txt/train.yaml").write_text(
        (r / "en-de/data/train/txt/train.yaml").read_text().replace("offset: 0.350000", "offset: 99.0", 1)),
     r"train\.yaml entry 1: offset 99\.000s is past the end of .*ted_1\.wav"),
])
def test_bad_input_is_named(mustc_corpus, tmp_path, capsys, damage, message):
    root = _corpus_copy(mustc_corpus[0], tmp_path / "MUSTC")
    damage(root)
    rc = mustc.main(["--mustc-root", str(root), "--out-dir", str(tmp_path / "out"), "--langs", "de",
                     "--splits", "train", "--workers", "1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not list((tmp_path / "out").glob("*.tsv"))


def test_every_task_and_language_needs_a_decoder_route(mustc_corpus, tmp_path, capsys):
    rc = mustc.main(["--mustc-root", str(mustc_corpus[0]), "--out-dir", str(tmp_path), "--langs", "de,es",
                     "--splits", "train", "--decoder-routes", "transcribe,translate:de", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "--decoder-routes transcribe,translate:de: task token 'translate' (target language 'es') " \
                       "has no decoder route" in err, err
    assert not list(tmp_path.iterdir())  # refused before any work


def test_a_missing_split_is_named(mustc_corpus, tmp_path, capsys):
    rc = mustc.main(["--mustc-root", str(mustc_corpus[0]), "--out-dir", str(tmp_path), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and re.search(r"en-de/data/dev/wav: not found .* or leave the split out with --splits", err), err
