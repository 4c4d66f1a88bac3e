"""recipes/generic/prep.sh: a folder of audio in several formats and rates + a TSV of transcripts/translations."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fairseq_smoe.data import audio
from fairseq_smoe.prep import generic
from recipe_helpers import SENTENCES, check_frames_and_routes, manifests, run_recipe, say, validate

# the fixtures write mp3; soundfile >= 0.12 wheels bundle libsndfile >= 1.1, which reads and writes it
pytestmark = pytest.mark.skipif("MP3" not in sf.available_formats(), reason="this libsndfile has no mp3 support")

HEADER = ["id", "audio", "transcript", "translation", "tgt_lang", "speaker", "split", "bandwidth", "offset",
          "duration"]


def make_folder(root: Path, cache: Path) -> dict:
    """Audio files of every kind the recipe handles; returns facts the test checks against."""
    (root / "clips").mkdir(parents=True)
    s = [say(SENTENCES[i][0], v, cache) for i, v in enumerate(["slt", "rms", "awb", "kal16", "slt", "rms", "awb"])]
    sf.write(root / "clips" / "a.wav", s[0], 16000, subtype="PCM_16")  # WB wav, in place
    sf.write(root / "clips" / "b.flac", s[1], 16000)  # WB flac, in place
    sf.write(root / "clips" / "c.mp3", audio.resample(s[2], 16000, 44100), 44100, format="MP3")  # decoded to wav
    sf.write(root / "clips" / "d.wav", audio.telephone_channel(s[3], 16000), 8000, subtype="PCM_16")  # NB source
    # 22159 samples at 22.05 kHz resample to 16080 at 16 kHz (torchaudio rounds up; rounding to nearest gives 16079,
    # one fbank frame fewer): n_frames must follow the resampler
    e22 = audio.resample(s[4], 16000, 22050)[:22159]
    sf.write(root / "clips" / "e.wav", e22, 22050, subtype="PCM_16")
    gap = np.zeros(4000, np.float32)
    sf.write(root / "clips" / "talk.wav", np.concatenate([gap, s[5], gap, s[6], gap]), 16000, subtype="PCM_16")
    t1, t2 = 4000 / 16000, (8000 + len(s[5])) / 16000
    rows = [
        ["a1", "clips/a.wav", SENTENCES[0][0], SENTENCES[0][2], "es", "slt", "train", "", "", ""],
        ["a1", "clips/a.wav", "", SENTENCES[0][1], "de", "slt", "train", "", "", ""],  # a second translation
        ["", "clips/b.flac", SENTENCES[1][0], "", "", "rms", "train", "", "", ""],  # id from the file name
        ["", "clips/c.mp3", SENTENCES[2][0], SENTENCES[2][2], "es", "awb", "train", "", "", ""],
        ["d1", "clips/d.wav", SENTENCES[3][0], SENTENCES[3][2], "es", "kal16", "train", "", "", ""],
        ["e1", "clips/e.wav", SENTENCES[4][0], "", "", "slt", "train", "", "", ""],
        ["talk_1", "clips/talk.wav", SENTENCES[5][0], SENTENCES[5][2], "es", "rms", "test", "", f"{t1:.6f}",
         f"{len(s[5]) / 16000:.6f}"],
        ["talk_2", "clips/talk.wav", SENTENCES[6][0], "", "", "awb", "test", "nb", f"{t2:.6f}",
         f"{len(s[6]) / 16000:.6f}"],  # NB speech stored at 16 kHz, said by the bandwidth column
    ]
    (root / "corpus.tsv").write_text("\n".join("\t".join(r) for r in [HEADER] + rows) + "\n")
    return {"speech": s, "e_samples": len(e22)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, flite_cache):
    root = tmp_path_factory.mktemp("generic")
    return root, make_folder(root, flite_cache)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("generic_out")
    run_recipe("generic", "--tsv", corpus[0] / "corpus.tsv", "--out-dir", out, "--vocab-size", "90",
               "--audio-format", "flac", "--workers", "2")
    return out


def test_rows_bandwidths_and_audio_handling(corpus, prepared):
    root, facts = corpus
    m = manifests(prepared)
    rows = {r["id"]: r for r in m["train"] + m["test"]}
    # WB sources: wb rows + NB copies; NB sources (8 kHz, or the bandwidth column): nb rows only, no copy
    assert sorted(rows) == sorted(
        [f"a1_{t}_{bw}" for t in ("asr_en", "st_de", "st_es") for bw in ("wb", "nb")]
        + [f"b_asr_en_{bw}" for bw in ("wb", "nb")]
        + [f"c_{t}_{bw}" for t in ("asr_en", "st_es") for bw in ("wb", "nb")]
        + ["d1_asr_en_nb", "d1_st_es_nb"] + [f"e1_asr_en_{bw}" for bw in ("wb", "nb")]
        + [f"talk_1_{t}_{bw}" for t in ("asr_en", "st_es") for bw in ("wb", "nb")] + ["talk_2_asr_en_nb"])
    assert rows["a1_st_de_wb"]["tgt_text"] == SENTENCES[0][1] and rows["a1_st_es_nb"]["tgt_text"] == SENTENCES[0][2]
    for uid, name in (("a1", "a.wav"), ("b", "b.flac"), ("d1", "d.wav"), ("e1", "e.wav")):  # referenced in place
        bw = "nb" if uid == "d1" else "wb"
        assert rows[f"{uid}_asr_en_{bw}"]["audio"] == str((root / "clips" / name).resolve())
    assert rows["c_asr_en_wb"]["audio"] == "audio/train/wb/c.flac"  # mp3 -> 16 kHz (flac by --audio-format)
    assert sf.info(str(prepared / "audio/train/wb/c.flac")).samplerate == 16000
    assert facts["e_samples"] == 22159 and rows["e1_asr_en_wb"]["n_frames"] == str(audio.num_fbank_frames(16080))
    # segments cut out of talk.wav; talk_2 is NB at 16 kHz: written as it is, no telephone copy of it
    seg, sr = sf.read(prepared / rows["talk_1_asr_en_wb"]["audio"], dtype="float32")
    assert sr == 16000 and len(seg) == len(facts["speech"][5])
    assert rows["talk_2_asr_en_nb"]["audio"] == "audio/test/nb/talk_2.flac"
    assert sf.info(str(prepared / "audio/test/nb/talk_2.flac")).samplerate == 16000
    assert not (prepared / "audio/train/nb/d1.flac").exists()
    assert sorted(m) == sorted(["train", "test"]
                               + [f"train_{x}_{bw}" for x in ("asr_en", "st_es") for bw in ("nb", "wb")]
                               + ["train_st_de_nb", "train_st_de_wb", "test_asr_en_nb", "test_asr_en_wb",
                                  "test_st_es_nb", "test_st_es_wb"])
    assert check_frames_and_routes(prepared, "train") == 16
    assert check_frames_and_routes(prepared, "test") == 5
    assert validate(prepared) == 0


@pytest.mark.parametrize("tsv,message", [
    ("audio\ttranscipt\nclips/a.wav\thello\n", r"corpus\.tsv: header .* unknown column\(s\) \['transcipt'\]"),
    ("audio\ttranscript\nclips/a.wav\n", r"corpus\.tsv:2: 1 tab-separated fields, the header has 2"),
    ("audio\ttranscript\nclips/zz.wav\thello\n", r"corpus\.tsv:2: audio file .*clips/zz\.wav not found"),
    ("audio\ttranscript\ttranslation\nclips/a.wav\t\t\n", r"corpus\.tsv:2: neither a transcript nor a translation"),
    ("audio\ttranslation\nclips/a.wav\thola\n", r"corpus\.tsv:2: a translation needs its language"),
    ("audio\ttranscript\tbandwidth\nclips/a.wav\thi\tsb\n", r"corpus\.tsv:2: bandwidth 'sb' is not nb or wb"),
    ("audio\ttranscript\toffset\tduration\nclips/a.wav\thi\tsoon\t1\n",
     r"corpus\.tsv:2: offset 'soon' is not a number"),
    ("audio\ttranscript\toffset\tduration\nclips/a.wav\thi\t0.5\t\n", r"corpus\.tsv:2: give both offset and duration"),
    ("id\taudio\ttranscript\nx\tclips/a.wav\thi\nx\tclips/b.flac\tho\n",
     r"corpus\.tsv:3: id 'x' was first used at .*corpus\.tsv:2 with source"),
    ("audio\ttranscript\toffset\tduration\nclips/a.wav\thi\t30\t1\n",
     r"corpus\.tsv:2: offset 30\.000s is past the end"),
])
def test_bad_input_is_named(corpus, tmp_path, capsys, tsv, message):
    shutil.copytree(corpus[0] / "clips", tmp_path / "clips")
    (tmp_path / "corpus.tsv").write_text(tsv)
    rc = generic.main(["--tsv", str(tmp_path / "corpus.tsv"), "--out-dir", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and re.search(message, err), err
    assert not list((tmp_path / "out").glob("*.tsv"))
