"""recipes/librispeech/prep.sh on a tiny LibriSpeech in the real layout:
<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac + <speaker>-<chapter>.trans.txt."""

import re
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from fairseq_smoe.prep import librispeech
from recipe_helpers import SENTENCES, check_frames_and_routes, manifests, run_recipe, say, validate

# split -> speaker -> chapter -> (flite voice, sentence indices)
LAYOUT = {
    "train-clean-100": {"103": ("1240", "slt", [0, 1, 2]), "1034": ("121119", "rms", [3, 4])},
    "dev-clean": {"1272": ("128104", "awb", [5, 6])},
}


def make_librispeech(root: Path, cache: Path) -> dict:
    """Returns {utterance id: (split, flac path, samples, sentence index)}."""
    utts = {}
    for split, speakers in LAYOUT.items():
        for spk, (chapter, voice, idx) in speakers.items():
            d = root / split / spk / chapter
            d.mkdir(parents=True)
            lines = []
            for n, i in enumerate(idx):
                uid = f"{spk}-{chapter}-{n:04d}"
                wav = say(SENTENCES[i][0], voice, cache)
                sf.write(d / f"{uid}.flac", wav, 16000, subtype="PCM_16")
                lines.append(f"{uid} {SENTENCES[i][0].upper()}")
                utts[uid] = (split, d / f"{uid}.flac", len(wav), i)
            (d / f"{spk}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return utts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, flite_cache):
    root = tmp_path_factory.mktemp("ls") / "LibriSpeech"
    return root, make_librispeech(root, flite_cache)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ls_out")
    run_recipe("librispeech", "--librispeech-root", corpus[0], "--out-dir", out, "--vocab-size", "60",
               "--workers", "2")
    return out


def test_manifests_reference_the_flacs_and_add_nb_copies(corpus, prepared):
    root, utts = corpus
    m = manifests(prepared)
    assert sorted(m) == sorted(f"{s}{x}" for s in LAYOUT for x in ("", "_asr_en_nb", "_asr_en_wb"))
    assert len(m["train-clean-100"]) == 2 * 5 and len(m["dev-clean"]) == 2 * 2
    for split in LAYOUT:
        for r in m[split]:
            uid = r["id"].rsplit("_asr_en_", 1)[0]
            u_split, flac, samples, i = utts[uid]
            assert u_split == split and r["tgt_text"] == SENTENCES[i][0]  # lower-cased like fairseq's recipe
            assert (r["task"], r["tgt_lang"], r["speaker"]) == ("asr", "en", uid.split("-")[0])
            if r["bandwidth"] == "wb":  # the corpus flac, in place
                assert r["audio"] == str(flac.resolve())
            else:
                assert r["audio"] == f"audio/{split}/nb/{uid.split('-')[0]}/{uid}.wav"
                info = sf.info(str(prepared / r["audio"]))
                assert info.samplerate == 8000 and info.frames == samples // 2
    assert check_frames_and_routes(prepared, "train-clean-100") == 10
    assert check_frames_and_routes(prepared, "dev-clean") == 4
    assert validate(prepared) == 0


def test_wideband_only_copies_no_audio(corpus, tmp_path):
    rc = librispeech.main(["--librispeech-root", str(corpus[0]), "--out-dir", str(tmp_path), "--splits",
                           "dev-clean", "--bandwidths", "wb", "--vocab-size", "40", "--keep-case", "--workers", "1"])
    assert rc == 0 and not (tmp_path / "audio").exists()
    m = manifests(tmp_path)
    assert sorted(m) == ["dev-clean", "dev-clean_asr_en_wb"]
    assert [r["tgt_text"] for r in m["dev-clean"]] == [SENTENCES[5][0].upper(), SENTENCES[6][0].upper()]


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "103-1240-0001.flac").unlink(),
     r"103-1240\.trans\.txt:2: audio file .*103-1240-0001\.flac not found"),
    (lambda d: (d / "103-1240.trans.txt").write_text("103-1240-0000\n"),
     r"103-1240\.trans\.txt:1: expected '103-1240-<utt> TRANSCRIPT', got '103-1240-0000'"),
    (lambda d: (d / "103-1240-0000.flac").write_bytes(b"not audio"),
     r"103-1240\.trans\.txt:1: cannot read .*0000\.flac"),
])
def test_bad_input_is_named(corpus, tmp_path, capsys, damage, message):
    root = tmp_path / "LibriSpeech"
    shutil.copytree(corpus[0], root)
    damage(root / "train-clean-100" / "103" / "1240")
    rc = librispeech.main(["--librispeech-root", str(root), "--out-dir", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and re.search(message, err), err
    assert not list((tmp_path / "out").glob("*.tsv"))
