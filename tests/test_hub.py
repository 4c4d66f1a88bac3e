"""The Python hub interface end to end on a model trained here: real files and arrays in, text and routes out.

The strongest check is the first: for the same rows and beam, ``SMoEHubInterface`` gives exactly fairseq-generate's
hypotheses (NB and WB, ASR and ST), so its features, guiding prefixes and routes are the dataset's.
The model is conftest's ``trained`` fixture (tests/hub_model.py: a tiny model trained once per test session).
"""

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from hub_model import BEAM, MAX_LEN_B, fairseq_generate, manifest_rows


@pytest.mark.parametrize("subset,ctc_weight", [("test_asr_nb", 0.0), ("test_asr_wb", 0.0), ("test_st_nb", 0.0),
                                               ("test_st_wb", 0.0), ("test_asr_nb", 0.4)])
def test_hub_hypotheses_equal_fairseq_generate(trained, hub, subset, ctc_weight, tmp_path):
    data = trained["corpus"]
    extra = ["--ctc-decode-weight", str(ctc_weight)] if ctc_weight else []
    want = fairseq_generate(data, trained["model"] / "checkpoint_best.pt", subset, tmp_path, *extra)
    rows = manifest_rows(data, subset)
    assert sorted(want) == list(range(len(rows)))
    paths = [data / r["audio"] for r in rows]
    decode = hub.transcribe if rows[0]["task"] == "asr" else hub.translate
    got = decode(paths, beam=BEAM, max_len_b=MAX_LEN_B, ctc_weight=ctc_weight)
    assert [g.text for g in got] == [want[i] for i in range(len(rows))]
    for g, r in zip(got, rows):  # the route each input took: detected bandwidth, the task asked for
        assert (g.bandwidth, g.task, g.lang) == (r["bandwidth"], r["task"], r["tgt_lang"])
        assert g.segments is None and g.path == str(data / r["audio"])
    # not all the same string: a model that says one thing for everything would prove little
    assert len({g.text for g in got}) > 1 or subset.startswith("test_st")


def test_arrays_any_rate_and_given_bandwidth(trained, hub):
    """An array with its rate gives the file's result; 8 kHz audio resampled to 44.1 kHz is still read
    (rate rule: wb) and follows the bandwidth it is given; 1 x T tensors work like 1-D arrays."""
    data = trained["corpus"]
    row = manifest_rows(data, "test_asr_nb")[0]
    path = data / row["audio"]
    from_file = hub.transcribe(path, beam=BEAM, max_len_b=MAX_LEN_B)
    wav, sr = sf.read(path, dtype="float32")
    assert sr == 8000 and from_file.bandwidth == "nb"
    assert hub.transcribe(wav, sample_rate=sr, beam=BEAM, max_len_b=MAX_LEN_B).text == from_file.text
    assert hub.transcribe((torch.from_numpy(wav)[None], sr), beam=BEAM, max_len_b=MAX_LEN_B).text == from_file.text
    from fairseq_smoe.data.audio import resample

    wav44 = resample(wav, 8000, 44100)
    detected = hub.transcribe(wav44, sample_rate=44100, beam=BEAM, max_len_b=MAX_LEN_B)
    assert detected.bandwidth == "wb"  # the fixture's config uses the rate rule
    given = hub.transcribe(wav44, sample_rate=44100, bandwidth="nb", beam=BEAM, max_len_b=MAX_LEN_B)
    assert given.bandwidth == "nb" and given.duration == pytest.approx(len(wav) / 8000, abs=1e-3)


def test_mixed_batch_under_a_token_budget_keeps_input_order(trained, hub):
    """NB and WB inputs in one call, batched under a small max_tokens: each result is what it gives alone."""
    data = trained["corpus"]
    paths = [data / r["audio"] for s in ("test_asr_nb", "test_asr_wb") for r in manifest_rows(data, s)]
    alone = [hub.transcribe(p, beam=BEAM, max_len_b=MAX_LEN_B).text for p in paths]
    batched = hub.transcribe(paths[::-1], beam=BEAM, max_len_b=MAX_LEN_B, max_tokens=400)
    assert [b.text for b in batched] == alone[::-1]
    assert [b.bandwidth for b in batched] == ["wb"] * 4 + ["nb"] * 4


def test_joint_ctc_weight_goes_through_the_tasks_joint_decoder(trained, hub, monkeypatch):
    from fairseq_smoe.decoding import joint_ctc

    data = trained["corpus"]
    path = data / manifest_rows(data, "test_asr_wb")[0]["audio"]
    calls = []
    original = joint_ctc.JointCtcAttentionEnsemble.__init__

    def spy(self, models, tgt_dict, weight, *args, **kwargs):
        calls.append(weight)
        original(self, models, tgt_dict, weight, *args, **kwargs)

    monkeypatch.setattr(joint_ctc.JointCtcAttentionEnsemble, "__init__", spy)
    out = hub.transcribe(path, beam=BEAM, max_len_b=MAX_LEN_B, ctc_weight=0.35)  # a weight not cached yet
    assert calls == [0.35] and isinstance(out.text, str)
    assert hub.task.args.ctc_decode_weight == 0.0  # the task's own setting is left as it was


def test_bad_requests_say_what_to_pass(trained, hub, tmp_path):
    from fairseq_smoe.data.audio import AudioError
    from fairseq_smoe.hub import HubError, from_pretrained

    data = trained["corpus"]
    path = data / manifest_rows(data, "test_asr_wb")[0]["audio"]
    with pytest.raises(HubError, match=r"lang:fr.*not in the model's dictionary"):
        hub.translate(path, tgt_lang="fr")
    with pytest.raises(HubError, match="sample rate"):
        hub.transcribe(np.zeros(16000, dtype=np.float32))
    with pytest.raises(HubError, match="bandwidth 'swb' has no encoder route"):
        hub.transcribe(path, bandwidth="swb")
    with pytest.raises(AudioError, match="outside the supported 8000-48000 Hz"):
        hub.transcribe(np.zeros(16000, dtype=np.float32), sample_rate=4000)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....WAVEfmt nothing")
    with pytest.raises(AudioError, match=re.escape(str(broken))):
        hub.transcribe(broken)
    no_lang = from_pretrained(trained["model"])  # the dictionary has <lang:en> and <lang:es>: ASR must be told
    with pytest.raises(HubError, match=r"pass lang=.*<lang:en>"):
        no_lang.transcribe(path)
    too_long = np.random.default_rng(0).standard_normal(16000 * 70).astype(np.float32) * 0.1  # 70 s > 6000 frames
    with pytest.raises(HubError, match="more than the model's 6000 source positions; cut it into segments"):
        hub.transcribe(too_long, sample_rate=16000, segment=False)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        from_pretrained(trained["model"], checkpoint_file="nope.pt")
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        from_pretrained(tmp_path / "missing")


def test_loads_under_weights_only_through_the_allow_list(trained):
    """The checkpoint loads with torch's weights_only unpickler (fairseq's checkpoint_utils, the plugin's
    allow-list) and the hub decodes the same text on a fresh interface."""
    import fairseq_smoe  # noqa: F401  (installs the allow-list)
    from fairseq import checkpoint_utils
    from fairseq_smoe.hub import from_pretrained

    state = checkpoint_utils.load_checkpoint_to_cpu(str(trained["model"] / "checkpoint_best.pt"))
    assert "model" in state
    data = trained["corpus"]
    path = data / manifest_rows(data, "test_asr_wb")[0]["audio"]
    a = from_pretrained(trained["model"], lang="en", device="cpu").transcribe(path, beam=BEAM, max_len_b=MAX_LEN_B)
    b = from_pretrained(trained["model"], lang="en").transcribe(path, beam=BEAM, max_len_b=MAX_LEN_B)
    assert a.text == b.text and a.tokens == b.tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_text(trained):
    from fairseq_smoe.hub import from_pretrained

    data = trained["corpus"]
    paths = [data / r["audio"] for r in manifest_rows(data, "test_asr_nb")]
    cpu = from_pretrained(trained["model"], lang="en").transcribe(paths, beam=BEAM, max_len_b=MAX_LEN_B)
    gpu_hub = from_pretrained(trained["model"], lang="en").cuda()
    assert gpu_hub.device.type == "cuda"
    assert from_pretrained(trained["model"], lang="en", device="cuda").device.type == "cuda"
    gpu = gpu_hub.transcribe(paths, beam=BEAM, max_len_b=MAX_LEN_B)
    assert [g.text for g in gpu] == [c.text for c in cpu]


@pytest.mark.parametrize("arch", ["s2t_encdec_smoe_xs", "s2t_encdec_lmoe_xs"])
def test_checkpoints_from_before_the_redesign_give_their_recorded_hypotheses(arch):
    """tests/data/pre_move: fairseq-generate's recorded hypotheses (beam 3, max-len-b 20) of an S-MoE and a
    learned-gate checkpoint; the hub gives the same texts and scores (fairseq prints base-2 scores)."""
    import json
    import math

    from fairseq_smoe.hub import from_pretrained

    data = Path(__file__).resolve().parent / "data" / "pre_move"
    expected = json.loads((data / "expected.json").read_text(encoding="utf-8"))["hypotheses"][arch]
    hub = from_pretrained(data, checkpoint_file=f"{arch}.pt", lang="en", tgt_lang="es")
    rows = manifest_rows(data, "test")
    for task in ("asr", "st"):
        idx = [i for i, r in enumerate(rows) if r["task"] == task]
        got = hub.generate([data / rows[i]["audio"] for i in idx], task=task, beam=3, max_len_b=20)
        assert [g.text for g in got] == [expected[str(i)]["text"] for i in idx]
        for g, i in zip(got, idx):
            assert g.score / math.log(2) == pytest.approx(expected[str(i)]["score"], abs=1e-4)
            assert g.bandwidth == rows[i]["bandwidth"]
