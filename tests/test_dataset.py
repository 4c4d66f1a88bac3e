"""Manifest -> dataset -> collater: routes, guiding prefixes and batching, on small synthetic audio files."""

import argparse
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from fairseq_smoe.data.audio import num_fbank_frames
from fairseq_smoe.data.manifest import ManifestError
from fairseq_smoe.tasks.speech_to_text_smoe import SpeechToTextSMoETask
from fairseq_smoe.data.vocab import build_vocab

TEXT = {
    "en": ["the cat sits on the mat", "good morning to you", "where is the station", "i like green tea"],
    "es": ["el gato se sienta en la alfombra", "buenos dias a ti", "donde esta la estacion", "me gusta el te verde"],
}
HEADER = ["id", "audio", "n_frames", "tgt_text", "speaker", "task", "src_lang", "tgt_lang"]


def write_corpus(root: Path, rows, config_extra=None, header=HEADER):
    """rows: (id, seconds, sample_rate, task, tgt_lang, text[, bandwidth])"""
    (root / "wav").mkdir(parents=True, exist_ok=True)
    if not (root / "spm.model").exists():
        build_vocab(TEXT["en"] + TEXT["es"], str(root), ["en", "es"], vocab_size=60)
    lines = ["\t".join(header)]
    rng = np.random.default_rng(0)
    for r in rows:
        uid, seconds, sr, task, lang, text = r[:6]
        n = int(seconds * sr)
        wav = (0.1 * rng.standard_normal(n)).astype(np.float32)
        sf.write(root / "wav" / f"{uid}.wav", wav, sr)
        fields = [uid, f"wav/{uid}.wav", str(num_fbank_frames(int(seconds * 16000))), text, "spk", task, "en", lang]
        if "bandwidth" in header:
            fields.append(r[6])
        lines.append("\t".join(fields))
    (root / "train.tsv").write_text("\n".join(lines) + "\n")
    cfg = {"input_feat_per_channel": 80, "vocab_filename": "spm.txt",
           "bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": "spm.model"}}
    cfg.update(config_extra or {})
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def make_task(root: Path, *extra):
    parser = argparse.ArgumentParser()
    SpeechToTextSMoETask.add_args(parser)
    args = parser.parse_args([str(root), *extra])
    args.seed = 1
    return SpeechToTextSMoETask.setup_task(args)


ROWS = [
    ("a", 0.6, 16000, "asr", "en", TEXT["en"][0]),
    ("b", 1.2, 8000, "st", "es", TEXT["es"][1]),
    ("c", 0.9, 8000, "asr", "en", TEXT["en"][2]),
    ("d", 0.3, 16000, "st", "es", TEXT["es"][3]),
    ("e", 1.0, 22050, "asr", "en", TEXT["en"][3]),
]


@pytest.fixture()
def corpus(tmp_path):
    return write_corpus(tmp_path, ROWS)


def test_routes_and_prefix_come_from_the_manifest(corpus):
    task = make_task(corpus)
    task.load_dataset("train")
    ds = task.datasets["train"]
    # bandwidth derived from the sample rate: 8 kHz -> nb, 16 kHz and 22.05 kHz -> wb
    assert ds.bandwidths == ["wb", "nb", "nb", "wb", "wb"]
    assert ds.encoder_routes.tolist() == [0, 1, 1, 0, 0]  # wb -> E0, nb -> E1
    assert ds.decoder_routes.tolist() == [0, 1, 0, 1, 0]
    d = task.target_dictionary
    item = ds[1]
    assert d.string(item.target[:2]) == "<translate> <lang:es>"
    assert item.target[-1] == d.eos()
    # 8 kHz audio is upsampled: features at the 16 kHz frame rate, 80 bins
    assert item.source.shape == (num_fbank_frames(int(1.2 * 16000)), 80)


def test_collater_keeps_routes_aligned_with_length_sorted_samples(corpus):
    task = make_task(corpus)
    task.load_dataset("train")
    ds = task.datasets["train"]
    batch = ds.collater([ds[i] for i in range(len(ds))])
    ids = batch["id"].tolist()
    lengths = batch["net_input"]["src_lengths"].tolist()
    assert lengths == sorted(lengths, reverse=True) and ids != list(range(len(ds)))
    assert batch["net_input"]["encoder_route_ids"].tolist() == [int(ds.encoder_routes[i]) for i in ids]
    assert batch["net_input"]["decoder_route_ids"].tolist() == [int(ds.decoder_routes[i]) for i in ids]
    assert batch["tasks"] == [ds.tasks[i] for i in ids]
    d = task.target_dictionary
    for row, i in enumerate(ids):
        # decoder input starts </s> <task> <lang>; the scored target has the prefix masked to pad
        prev = batch["net_input"]["prev_output_tokens"][row]
        assert prev[0] == d.eos() and torch.equal(prev[1:3], batch["decoder_prefix"][row])
        assert torch.equal(batch["decoder_prefix"][row], ds.prefixes[i])
        tgt = batch["target"][row]
        assert (tgt[:2] == d.pad()).all()
        n = int(batch["target_lengths"][row])
        assert d.string(tgt[2:2 + n]).replace(" ", "").replace("\u2581", " ").strip() == ds.tgt_texts[i]
    assert batch["ntokens"] == int(batch["target_lengths"].sum())


def route_pair(ds, index):
    """The (encoder, decoder) route ids of a sample, from the dataset's public id arrays."""
    return int(ds.encoder_routes[index]), int(ds.decoder_routes[index])


def test_batches_are_homogeneous_by_default_and_mixed_on_request(tmp_path):
    rows = [(f"u{i}", 0.3 + 0.05 * i, [8000, 16000][i % 2], ["asr", "st"][(i // 2) % 2],
             ["en", "es"][(i // 2) % 2], TEXT[["en", "es"][(i // 2) % 2]][i % 4]) for i in range(16)]
    write_corpus(tmp_path / "h", rows)
    task = make_task(tmp_path / "h")
    task.load_dataset("train")
    ds = task.datasets["train"]
    batches = ds.batch_by_size(ds.ordered_indices(), max_sentences=3)
    assert sorted(int(i) for b in batches for i in b) == list(range(16))
    for b in batches:
        assert len({route_pair(ds, int(i)) for i in b}) == 1
    assert len({route_pair(ds, int(b[0])) for b in batches}) == 4

    write_corpus(tmp_path / "m", rows, {"smoe": {"homogeneous_batches": False}})
    task = make_task(tmp_path / "m")
    task.load_dataset("train")
    ds = task.datasets["train"]
    batches = ds.batch_by_size(ds.ordered_indices(), max_sentences=3)
    assert any(len({route_pair(ds, int(i)) for i in b}) > 1 for b in batches)


def test_homogeneous_batches_keep_route_pairs_apart_for_any_number_of_decoder_routes(tmp_path):
    """The batching key once was encoder * 1000 + decoder: with 1000+ decoder routes, pairs collided."""
    rows = [(f"u{i}", 0.3 + 0.05 * i, [8000, 16000][i % 2], ["asr", "st"][(i // 2) % 2],
             ["en", "es"][(i // 2) % 2], TEXT[["en", "es"][(i // 2) % 2]][i % 4]) for i in range(16)]
    write_corpus(tmp_path, rows)
    task = make_task(tmp_path)
    task.load_dataset("train")
    ds = task.datasets["train"]
    from fairseq_smoe.routing import RoutingTable

    ds.routing_table = RoutingTable(["wb", "nb"], ["transcribe", "translate"] + [f"r{i}" for i in range(999)])
    ds.decoder_routes = ds.decoder_routes * 1000  # decoder routes 0 and 1000 of a 1001-route table
    pairs = {route_pair(ds, i) for i in range(len(ds))}
    assert (1, 0) in pairs and (0, 1000) in pairs  # 1 * 1000 + 0 == 0 * 1000 + 1000
    batches = ds.batch_by_size(ds.ordered_indices(), max_sentences=3)
    assert sorted(int(i) for b in batches for i in b) == list(range(16))
    for b in batches:
        assert len({route_pair(ds, int(i)) for i in b}) == 1, [route_pair(ds, int(i)) for i in b]


def test_collater_hands_the_routes_to_the_model_on_the_host_too(corpus):
    from fairseq_smoe.routing import RoutePlan

    task = make_task(corpus)
    task.load_dataset("train")
    ds = task.datasets["train"]
    batch = ds.collater([ds[i] for i in range(len(ds))])
    plan = batch["net_input"]["route_plan"]
    assert isinstance(plan, RoutePlan)
    assert plan.encoder.tolist() == batch["net_input"]["encoder_route_ids"].tolist()
    assert plan.decoder.tolist() == batch["net_input"]["decoder_route_ids"].tolist()
    # which rows are ASR rows, from the decoder routes (transcribe = 0), in the batch's row order
    assert plan.asr.tolist() == [t == "asr" for t in batch["tasks"]]
    assert plan.asr.tolist() == (batch["net_input"]["decoder_route_ids"] == 0).tolist()


def test_force_task_decodes_an_asr_set_as_st(corpus):
    task = make_task(corpus, "--force-task", "st", "--force-tgt-lang", "es")
    task.load_dataset("train")
    ds = task.datasets["train"]
    assert set(ds.tasks) == {"st"} and ds.decoder_routes.tolist() == [1] * 5
    assert task.target_dictionary.string(ds[0].prefix) == "<translate> <lang:es>"
    assert ds.tgt_texts[0] == TEXT["en"][0]  # the reference stays what the manifest says


def test_generator_strips_guiding_tokens(corpus):
    task = make_task(corpus)
    from fairseq_smoe.cli import params
    from fairseq_smoe.routing import RoutingTable

    model = params.ARCH_MODEL_REGISTRY["s2t_dec_smoe_xs"].build_model(
        params.model_args("s2t_dec_smoe_xs", RoutingTable()), task)
    gen = task.build_generator([model], argparse.Namespace(beam=1, prefix_size=0))
    d = task.target_dictionary
    for sym in ("<transcribe>", "<translate>", "<lang:en>", "<lang:es>"):
        assert d.index(sym) in gen.symbols_to_strip_from_output


@pytest.mark.parametrize("rows,message", [
    ([("a", 0.5, 16000, "mt", "en", "x")], "unknown task 'mt'"),
    ([("a", 0.5, 16000, "asr", "en", "  ")], "empty tgt_text"),
    ([("a", 0.5, 16000, "st", "fr", "bonjour")], "<lang:fr> is not in the dictionary"),
    ([("a", 0.5, 16000, "asr", "en", "x"), ("a", 0.5, 16000, "asr", "en", "y")], "duplicate id"),
])
def test_bad_rows_name_file_and_row(tmp_path, rows, message):
    write_corpus(tmp_path, rows)
    task = make_task(tmp_path)
    with pytest.raises(ManifestError, match=message) as e:
        task.load_dataset("train")
    assert "train.tsv:" in str(e.value)


def test_explicit_bandwidth_column_and_unknown_bandwidth(tmp_path):
    rows = [("a", 0.5, 16000, "asr", "en", "x", "nb"), ("b", 0.5, 16000, "asr", "en", "y", "sb")]
    write_corpus(tmp_path, rows, header=HEADER + ["bandwidth"])
    task = make_task(tmp_path)
    with pytest.raises(ManifestError, match=r"train.tsv:3 \(id 'b'\): bandwidth 'sb' has no encoder route"):
        task.load_dataset("train")


def test_missing_guiding_tokens_are_reported_at_startup(tmp_path):
    write_corpus(tmp_path, ROWS[:1])
    lines = [l for l in (tmp_path / "spm.txt").read_text().splitlines() if not l.startswith("<transcribe>")]
    (tmp_path / "spm.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"guiding token\(s\) \['<transcribe>'\] missing"):
        make_task(tmp_path)


def test_batching_keeps_every_sample_whatever_the_batch_multiple(tmp_path):
    """fairseq drops a trailing batch that is not a multiple of --required-batch-size-multiple; we must not."""
    rows = [(f"u{i}", 0.3 + 0.05 * i, [8000, 16000][i % 2], "asr", "en", TEXT["en"][i % 4]) for i in range(11)]
    write_corpus(tmp_path, rows)
    task = make_task(tmp_path)
    task.load_dataset("train")
    ds = task.datasets["train"]
    for max_sentences, multiple in [(8, 8), (4, 8), (None, 8), (3, 1)]:
        batches = ds.batch_by_size(ds.ordered_indices(), max_tokens=None if max_sentences else 10_000,
                                   max_sentences=max_sentences, required_batch_size_multiple=multiple)
        assert sorted(int(i) for b in batches for i in b) == list(range(11)), (max_sentences, multiple)


def test_global_cmvn_and_specaugment_come_from_config_transforms(tmp_path):
    """fairseq's own S2T feature transforms apply: global CMVN everywhere, SpecAugment on train splits only."""
    from fairseq_smoe.data import audio

    write_corpus(tmp_path, ROWS[:2])
    mean, std = np.full(80, 3.0, dtype=np.float32), np.full(80, 2.0, dtype=np.float32)
    np.savez(tmp_path / "gcmvn.npz", mean=mean, std=std)
    write_corpus(tmp_path, ROWS[:2], config_extra={
        "global_cmvn": {"stats_npz_path": str(tmp_path / "gcmvn.npz")},
        "transforms": {"*": ["global_cmvn"], "_train": ["global_cmvn", "specaugment"]},
        "specaugment": {"freq_mask_F": 20, "freq_mask_N": 2, "time_mask_N": 2, "time_mask_T": 20,
                        "time_mask_p": 1.0, "time_wrap_W": 0},
    })
    (tmp_path / "dev.tsv").write_text((tmp_path / "train.tsv").read_text())
    task = make_task(tmp_path)
    task.load_dataset("train")
    task.load_dataset("dev")
    wav, sr = audio.read_waveform(audio.resolve("wav/a.wav", str(tmp_path)))
    raw = torch.from_numpy(audio.fbank(audio.resample(wav, sr)))
    dev = task.datasets["dev"][0].source
    assert torch.allclose(dev, (raw - 3.0) / 2.0, atol=1e-5)
    train = task.datasets["train"][0].source
    assert not torch.allclose(train, dev) and (train != dev).float().mean() > 0.05
    # seeded per (epoch, sample): the same sample gives the same augmentation, another epoch another one
    assert torch.equal(train, task.datasets["train"][0].source)
    task.datasets["train"].set_epoch(2)
    assert not torch.equal(train, task.datasets["train"][0].source)


def test_manifest_column_lists_agree():
    """One module lists the columns: what prep writes is what the dataset reads, and stock fairseq's are among them."""
    from fairseq_smoe.data import manifest

    assert set(manifest.REQUIRED_COLUMNS) <= set(manifest.MANIFEST_COLUMNS)
    assert set(manifest.MANIFEST_COLUMNS) <= set(manifest.REQUIRED_COLUMNS) | set(manifest.OPTIONAL_COLUMNS)
    assert [c for c in manifest.MANIFEST_COLUMNS if c in manifest.STOCK_MANIFEST_COLUMNS] == \
        manifest.STOCK_MANIFEST_COLUMNS
