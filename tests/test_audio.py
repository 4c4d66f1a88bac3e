"""Audio I/O, features and bandwidth labels (fairseq_smoe.data.audio, manifest.derive_bandwidth), partly on flite speech."""

import re
import struct
import zipfile

import numpy as np
import pytest
import soundfile as sf
import yaml

from fairseq_smoe.data import audio
from fairseq_smoe.data.config import SMoEDataConfig
from fairseq_smoe.data.manifest import derive_bandwidth, read_manifest
from fairseq_smoe.routing import guiding_token, lang_tag
from fixture_corpus import HEADER, SENTENCES

THRESHOLD_DB = SMoEDataConfig().spectral_threshold_db
# Sentences with sibilants: their WB speech has clear energy above 4 kHz for every flite voice. Sibilant-free ones
# ("i need a new phone") sit only a few dB above the threshold as WB (awb: -46 dB), so they make no clean pair.
SIBILANT_SENTENCES = (0, 5, 6)


def _noise(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


def _clips(corpus):
    """(name, 16 kHz WB speech, its 8 kHz telephone copy) for every speaker and sibilant sentence."""
    for spk in corpus["train_speakers"] + corpus["test_speakers"]:
        for i in SIBILANT_SENTENCES:
            wb, sr = sf.read(corpus["root"] / f"wav/16k/{spk}_{i:03d}.wav", dtype="float32")
            nb, nb_sr = sf.read(corpus["root"] / f"wav/8k/{spk}_{i:03d}.wav", dtype="float32")
            assert (sr, nb_sr) == (16000, 8000)
            yield f"{spk}_{i:03d}", wb, nb


def _ref(path) -> audio.AudioRef:
    return audio.resolve(str(path), None)


# ------------------------------------------------------------------ telephone channel and spectral bandwidth
def test_telephone_channel_output():
    wav = _noise(16001)
    nb = audio.telephone_channel(wav, 16000)
    assert nb.dtype == np.float32 and nb.shape == (8001,)
    assert np.abs(nb).max() <= 1.0


def test_telephone_channel_removes_energy_above_4khz(flite_corpus):
    rows = []
    for name, wb, nb in _clips(flite_corpus):
        wb_db = audio.high_band_energy_db(wb, 16000)
        nb_db = audio.high_band_energy_db(audio.resample(nb, 8000), 16000)
        rows.append((name, wb_db, nb_db))
    print("\nenergy above 4 kHz (dB re total), WB flite speech vs its telephone copy upsampled to 16 kHz:")
    for name, wb_db, nb_db in rows:
        print(f"  {name:10s} wb {wb_db:6.1f}  nb@16k {nb_db:6.1f}")
    for name, wb_db, nb_db in rows:
        assert wb_db > THRESHOLD_DB + 5, name
        assert nb_db < THRESHOLD_DB, name
        assert wb_db - nb_db > 15, name


def test_spectral_bandwidth(flite_corpus):
    for name, wb, nb in _clips(flite_corpus):
        assert audio.spectral_bandwidth(wb, 16000, THRESHOLD_DB) == "wb", name
        assert audio.spectral_bandwidth(audio.resample(nb, 8000), 16000, THRESHOLD_DB) == "nb", name
        assert audio.spectral_bandwidth(nb, 8000, THRESHOLD_DB) == "nb", name  # nothing above 4 kHz at 8 kHz


@pytest.mark.parametrize("sr,expected", [(8000, "nb"), (11025, "nb"), (16000, "wb"), (22050, "wb"), (44100, "wb")])
def test_bandwidth_from_rate(sr, expected):
    assert audio.bandwidth_from_rate(sr) == expected


def test_derive_bandwidth(tmp_path, flite_corpus):
    wb, _ = sf.read(flite_corpus["root"] / "wav/16k/rms_000.wav", dtype="float32")
    nb = audio.telephone_channel(wb, 16000)
    files = {"nb8k.wav": (nb, 8000), "wb16k.wav": (wb, 16000), "nb16k.wav": (audio.resample(nb, 8000), 16000)}
    for name, (wav, sr) in files.items():
        sf.write(tmp_path / name, wav, sr, subtype="PCM_16")
    expected = {
        "rate": {"nb8k.wav": "nb", "wb16k.wav": "wb", "nb16k.wav": "wb"},  # the header is all "rate" looks at
        "spectral": {"nb8k.wav": "nb", "wb16k.wav": "wb", "nb16k.wav": "nb"},
    }
    for mode, labels in expected.items():
        cfg = SMoEDataConfig(bandwidth_detection=mode)
        assert {name: derive_bandwidth(_ref(tmp_path / name), cfg) for name in files} == labels, mode
    np.save(tmp_path / "feats.npy", np.zeros((10, 80), dtype=np.float32))
    with pytest.raises(audio.AudioError, match="feats.npy.*no sample rate"):
        derive_bandwidth(_ref(tmp_path / "feats.npy"), SMoEDataConfig(bandwidth_detection="spectral"))


# ------------------------------------------------------------------ features and resampling
@pytest.mark.parametrize("n", [0, 399, 400, 401, 559, 560, 12345, 16000])
def test_fbank_shape(n):
    feats = audio.fbank(_noise(n))
    assert feats.shape == (audio.num_fbank_frames(n), 80)
    assert np.isfinite(feats).all()


def test_num_fbank_frames():
    assert [audio.num_fbank_frames(n) for n in (0, 399, 400, 559, 560, 16000)] == [0, 0, 1, 1, 2, 98]


@pytest.mark.parametrize("n", [1, 7, 8000, 12345])
def test_resample_8k_to_16k_doubles_length(n):
    out = audio.resample(_noise(n), 8000)
    assert out.shape == (2 * n,) and out.dtype == np.float32


def test_resample_same_rate_is_identity():
    wav = _noise(100)
    assert audio.resample(wav, 16000) is wav


# ------------------------------------------------------------------ resolve / read errors
def test_resolve(tmp_path):
    assert audio.resolve("wav/a.wav", str(tmp_path)) == audio.AudioRef(str(tmp_path / "wav/a.wav"))
    assert audio.resolve("/abs/a.flac", str(tmp_path)) == audio.AudioRef("/abs/a.flac")
    assert audio.resolve("f.zip:12:34", str(tmp_path)) == audio.AudioRef(str(tmp_path / "f.zip"), 12, 34)
    for bad in ("clip.mp3", "f.zip:12", "f.zip:x:34"):
        with pytest.raises(audio.AudioError, match=re.escape(bad)):
            audio.resolve(bad, str(tmp_path))


def test_missing_file_is_named(tmp_path):
    for field in ("gone.wav", "gone.npy", "gone.zip:0:10"):
        ref = audio.resolve(field, str(tmp_path))
        for read in (audio.read_waveform, audio.read_features, audio.sample_rate_of):
            with pytest.raises(audio.AudioError, match=re.escape(str(tmp_path / "gone")) + ".*file not found"):
                read(ref)


def test_stereo_wav_is_rejected(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([_noise(1600), _noise(1600, seed=1)], axis=1), 16000)
    assert audio.sample_rate_of(_ref(path)) == 16000  # the header alone is fine
    with pytest.raises(audio.AudioError, match=re.escape(f"{path}: 2 channels")):
        audio.read_waveform(_ref(path))


def test_bad_features_are_rejected(tmp_path):
    nan = np.zeros((5, 80), dtype=np.float32)
    nan[2, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(audio.AudioError, match=re.escape(f"{tmp_path / 'nan.npy'}: ") + ".*NaN"):
        audio.read_features(_ref(tmp_path / "nan.npy"))
    np.save(tmp_path / "flat.npy", np.zeros(80, dtype=np.float32))
    with pytest.raises(audio.AudioError, match=re.escape(f"{tmp_path / 'flat.npy'}: ") + ".*2-D"):
        audio.read_features(_ref(tmp_path / "flat.npy"))
    with pytest.raises(audio.AudioError, match="holds features, not audio"):
        audio.read_waveform(_ref(tmp_path / "flat.npy"))
    sf.write(tmp_path / "a.wav", _noise(1600), 16000)
    with pytest.raises(audio.AudioError, match="a.wav: not a .npy"):
        audio.read_features(_ref(tmp_path / "a.wav"))


def _stored_zip(path, members: dict) -> dict:
    """Write an uncompressed zip; return each member's ``offset:length`` slice field."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    fields = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            fields[info.filename] = f"{info.header_offset + 30 + name_len + extra_len}:{info.file_size}"
    return fields


def test_zip_slice_reads_like_the_file(tmp_path):
    wav_path = tmp_path / "clip.wav"
    sf.write(wav_path, _noise(12345), 8000, subtype="PCM_16")
    feats = np.arange(20 * 80, dtype=np.float32).reshape(20, 80)
    np.save(tmp_path / "feats.npy", feats)
    slices = _stored_zip(tmp_path / "data.zip", {
        "clip.wav": wav_path.read_bytes(), "feats.npy": (tmp_path / "feats.npy").read_bytes(),
    })
    wav_ref = audio.resolve(f"data.zip:{slices['clip.wav']}", str(tmp_path))
    assert wav_ref.is_slice and audio.sample_rate_of(wav_ref) == 8000
    got, sr = audio.read_waveform(wav_ref)
    want, _ = audio.read_waveform(_ref(wav_path))
    assert sr == 8000 and np.array_equal(got, want)
    npy_ref = audio.resolve(f"data.zip:{slices['feats.npy']}", str(tmp_path))
    assert audio.sample_rate_of(npy_ref) is None
    assert np.array_equal(audio.read_features(npy_ref), feats)
    size = (tmp_path / "data.zip").stat().st_size
    past_eof = audio.resolve(f"data.zip:{size - 10}:100", str(tmp_path))
    message = re.escape(f"{tmp_path / 'data.zip'}:{size - 10}:100: slice runs past the end")
    for read in (audio.read_waveform, audio.sample_rate_of):
        with pytest.raises(audio.AudioError, match=message):
            read(past_eof)


# ------------------------------------------------------------------ the flite corpus itself
def test_corpus_manifests_match_audio(flite_corpus):
    root = flite_corpus["root"]
    train_speakers, test_speakers = set(flite_corpus["train_speakers"]), set(flite_corpus["test_speakers"])
    assert flite_corpus["build_seconds"] < 60
    for split, path in flite_corpus["manifests"].items():
        assert path.read_text(encoding="utf-8").split("\n", 1)[0] == "\t".join(HEADER)
        rows = read_manifest(str(path))
        assert len(rows) == flite_corpus["rows"][split]
        assert {r["speaker"] for r in rows} <= (train_speakers if split == "train" else test_speakers)
        for r in rows:
            assert (r["task"], r["src_lang"], r["tgt_lang"]) in {("asr", "en", "en"), ("st", "en", "es")}
            assert r["tgt_text"] == SENTENCES[int(r["id"].split("_")[1])][0 if r["task"] == "asr" else 1]
            info = sf.info(root / r["audio"])
            assert info.channels == 1 and audio.bandwidth_from_rate(info.samplerate) == r["bandwidth"]
            n_16k = info.frames * audio.TARGET_SAMPLE_RATE // info.samplerate
            assert int(r["n_frames"]) == audio.num_fbank_frames(n_16k) > 0
        combos = {(r["task"], r["bandwidth"]) for r in rows}
        if split.startswith("test_"):
            assert combos == {tuple(split.split("_")[1:])}
        else:
            assert combos == {(t, b) for t in ("asr", "st") for b in ("nb", "wb")}


def test_corpus_n_frames_match_fbank(flite_corpus):
    """n_frames is what the dataset's front end computes (checked on the test sets; train rows share the code)."""
    for split in ("test_asr_nb", "test_asr_wb"):
        for r in read_manifest(str(flite_corpus["manifests"][split])):
            wav, sr = audio.read_waveform(audio.resolve(r["audio"], str(flite_corpus["root"])))
            assert audio.fbank(audio.resample(wav, sr)).shape[0] == int(r["n_frames"]), r["id"]


def test_corpus_config_and_vocab(flite_corpus):
    config = yaml.safe_load(flite_corpus["config"].read_text(encoding="utf-8"))
    assert config["input_feat_per_channel"] == 80
    smoe = SMoEDataConfig.from_dict(config["smoe"])
    assert smoe.encoder_routes == ("wb", "nb") and smoe.decoder_routes == ("transcribe", "translate")
    assert (flite_corpus["root"] / config["bpe_tokenizer"]["sentencepiece_model"]).is_file()
    dict_lines = (flite_corpus["root"] / config["vocab_filename"]).read_text(encoding="utf-8").splitlines()
    symbols = {line.split(" ")[0] for line in dict_lines}
    assert {guiding_token("transcribe"), guiding_token("translate"), lang_tag("en"), lang_tag("es")} <= symbols


def test_corpus_without_bandwidth_column(flite_corpus, flite_corpus_no_bandwidth):
    rate = SMoEDataConfig(bandwidth_detection="rate")
    for split, path in flite_corpus_no_bandwidth["manifests"].items():
        assert path.read_text(encoding="utf-8").split("\n", 1)[0] == "\t".join(HEADER[:-1])
        labelled = {r["id"]: r["bandwidth"] for r in read_manifest(str(flite_corpus["manifests"][split]))}
        for r in read_manifest(str(path)):
            ref = audio.resolve(r["audio"], str(flite_corpus_no_bandwidth["root"]))
            assert derive_bandwidth(ref, rate) == labelled[r["id"]], r["id"]
