"""recipes/covost2/prep.sh on a tiny Common Voice + CoVoST 2 in the real layout: <cv>/clips/*.mp3 (48 kHz),
<cv>/validated.tsv, covost_v2.en_de.tsv (path, sentence, translation, client_id, split) or its split files."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fairseq_smoe.data import audio
from fairseq_smoe.prep import covost2
from recipe_helpers import SENTENCES, check_frames_and_routes, manifests, run_recipe, say, validate

# the fixtures write mp3; soundfile >= 0.12 wheels bundle libsndfile >= 1.1, which reads and writes it
pytestmark = pytest.mark.skipif("MP3" not in sf.available_formats(), reason="this libsndfile has no mp3 support")

# clip number -> (CoVoST split, flite voice, sentence index)
CLIPS = {
    101: ("train", "slt", 0), 102: ("train_covost", "rms", 1), 103: ("train", "awb", 2),
    201: ("dev", "kal16", 3), 301: ("test", "slt", 4), 302: ("test", "rms", 5),
}
NOT_VALIDATED = 999  # listed by CoVoST but not in validated.tsv (a different Common Voice release)
CV_HEADER = ["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accent"]


def make_covost(cv: Path, cache: Path) -> dict:
    (cv / "clips").mkdir(parents=True)
    validated, covost, speech = [], [], {}
    for n, (split, voice, i) in CLIPS.items():
        name = f"common_voice_en_{n}.mp3"
        wav16 = say(SENTENCES[i][0], voice, cache)
        sf.write(cv / "clips" / name, audio.resample(wav16, 16000, 48000), 48000, format="MP3")
        speech[n] = wav16
        client = f"{voice}{n:04d}" + "f" * 120  # Common Voice client ids are 128-hex-digit hashes
        validated.append([client, name, SENTENCES[i][0].capitalize() + ".", "2", "0", "", "", ""])
        covost.append([name, SENTENCES[i][0], SENTENCES[i][1], client, split])
    covost.append([f"common_voice_en_{NOT_VALIDATED}.mp3", "gone", "weg", "x", "train"])
    (cv / "validated.tsv").write_text("\n".join("\t".join(r) for r in [CV_HEADER] + validated) + "\n")
    (cv / "covost_v2.en_de.tsv").write_text(
        "\n".join("\t".join(r) for r in [["path", "sentence", "translation", "client_id", "split"]] + covost) + "\n")
    return speech


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, flite_cache):
    cv = tmp_path_factory.mktemp("cv") / "cv-corpus-4" / "en"
    return cv, make_covost(cv, flite_cache)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("covost_out")
    res = run_recipe("covost2", "--cv-root", corpus[0], "--tgt-lang", "de", "--out-dir", out, "--vocab-size", "400",
                     "--vocab-type", "bpe", "--byte-fallback", "--workers", "2")
    return out, res


def test_manifests_from_mp3_with_asr_and_st_rows(corpus, prepared):
    cv, speech = corpus
    out, res = prepared
    m = manifests(out)
    assert sorted(m) == sorted(f"{s}{x}" for s in ("train", "dev", "test")
                               for x in ("", "_asr_en_nb", "_asr_en_wb", "_st_de_nb", "_st_de_wb"))
    # train = train + train_covost; the clip missing from validated.tsv is skipped with a warning
    assert {r["id"].split("_asr")[0] for r in m["train_asr_en_wb"]} == {f"common_voice_en_{n}" for n in (101, 102, 103)}
    assert "1 clip(s) of the requested splits are not in" in res.stderr
    assert len(m["train"]) == 3 * 2 * 2 and len(m["dev"]) == 4 and len(m["test"]) == 8
    for r in m["test"]:
        n = int(r["id"].split("_")[3])
        i = CLIPS[n][2]
        # ASR target is Common Voice's sentence (validated.tsv), ST target CoVoST's translation
        want = SENTENCES[i][0].capitalize() + "." if r["task"] == "asr" else SENTENCES[i][1]
        assert r["tgt_text"] == want and r["speaker"].startswith(CLIPS[n][1])
        assert r["audio"] == f"audio/test/{r['bandwidth']}/{n % 100:02d}/common_voice_en_{n}.wav"
        wav, sr = sf.read(out / r["audio"], dtype="float32")
        if r["bandwidth"] == "wb":  # the decoded mp3, at 16 kHz: the same speech flite made
            assert sr == 16000 and abs(len(wav) - len(speech[n])) <= 1
            k = min(len(wav), len(speech[n]))
            assert np.corrcoef(wav[:k], speech[n][:k])[0, 1] > 0.95
        else:
            assert sr == 8000 and audio.high_band_energy_db(audio.resample(wav, 8000), 16000) < -50
    assert check_frames_and_routes(out, "train") == 12
    assert check_frames_and_routes(out, "test") == 8
    assert validate(out) == 0


def test_byte_fallback_bpe_vocabulary(prepared):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(prepared[0] / "spm.model"))
    assert "<translate>" in sp.encode("<translate>", out_type=str)  # a guiding token is one piece
    assert "<0xD0> 1" in (prepared[0] / "spm.txt").read_text().splitlines()  # byte pieces are in fairseq's dict
    # a character never seen in training becomes UTF-8 byte pieces, not <unk>
    pieces = sp.encode("ж", out_type=str)
    assert pieces[-2:] == ["<0xD0>", "<0xB6>"] and sp.unk_id() not in sp.encode("ж")


def test_pre_split_covost_files(corpus, tmp_path):
    cv = tmp_path / "en"
    shutil.copytree(corpus[0], cv)
    rows = (cv / "covost_v2.en_de.tsv").read_text().splitlines()
    for split in ("train", "dev", "test"):
        keep = [r.split("\t") for r in rows[1:] if r.split("\t")[4] in (split, f"{split}_covost")]
        (cv / f"covost_v2.en_de.{split}.tsv").write_text(
            "\n".join("\t".join(r[:4]) for r in [["path", "sentence", "translation", "client_id"]] + keep) + "\n")
    (cv / "covost_v2.en_de.tsv").unlink()
    (cv / "validated.tsv").unlink()  # the split files carry the sentences
    (cv / "clips" / f"common_voice_en_{NOT_VALIDATED}.mp3").write_bytes((cv / "clips" / "common_voice_en_101.mp3")
                                                                       .read_bytes())
    rc = covost2.main(["--cv-root", str(cv), "--tgt-lang", "de", "--out-dir", str(tmp_path / "out"), "--splits",
                       "train", "--tasks", "st", "--bandwidths", "nb", "--vocab-size", "50", "--workers", "1"])
    assert rc == 0
    m = manifests(tmp_path / "out")
    assert sorted(m) == ["train", "train_st_de_nb"]
    assert sorted(r["id"] for r in m["train"]) == [f"common_voice_en_{n}_st_de_nb" for n in (101, 102, 103, 999)]
    assert not (tmp_path / "out" / "audio" / "train" / "wb").exists()  # NB only: no WB audio kept


@pytest.mark.parametrize("damage,message", [
    (lambda cv: (cv / "clips" / "common_voice_en_102.mp3").unlink(),
     r"covost_v2\.en_de\.tsv:3: audio file .*common_voice_en_102\.mp3 not found"),
    (lambda cv: (cv / "clips" / "common_voice_en_103.mp3").write_bytes(b"\0" * 100),
     r"covost_v2\.en_de\.tsv:4: cannot read .*common_voice_en_103\.mp3"),
    (lambda cv: (cv / "covost_v2.en_de.tsv").write_text("path\ttranslation\nx.mp3\ty\n"),
     r"covost_v2\.en_de\.tsv: missing column\(s\) \['split'\]"),
    (lambda cv: (cv / "validated.tsv").write_text((cv / "validated.tsv").read_text() + "only\ttwo\n"),
     r"validated\.tsv:8: 2 tab-separated fields, the header has 8"),
    (lambda cv: (cv / "covost_v2.en_de.tsv").unlink(),
     r"neither .*covost_v2\.en_de\.tsv nor .*covost_v2\.en_de\.train\.tsv"),
])
def test_bad_input_is_named(corpus, tmp_path, capsys, damage, message):
    cv = tmp_path / "en"
    shutil.copytree(corpus[0], cv)
    damage(cv)
    rc = covost2.main(["--cv-root", str(cv), "--tgt-lang", "de", "--out-dir", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and re.search(message, err), err
    assert not list((tmp_path / "out").glob("*.tsv"))
