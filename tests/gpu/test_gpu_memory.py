"""Peak GPU memory of joint CTC/attention beam search at a realistic size: an _s model with a 40k vocabulary (the
paper's BBPE size), 8 utterances of 12 s, beam 5 (the README's decode command). Joint decoding may add the CTC
log-probabilities once per *source* utterance (T x B x V fp32, with the log-softmax's transient second copy), not per
hypothesis row: T x (B * beam) x V per row, copied on every beam reorder, was about 10 GB here.

The CPU rehearsal runs the same decodings at a small size (the test's code and both decoders are exercised) and
skips the measurement, which only CUDA's allocator counters give."""

import pytest
import torch

from fairseq_smoe.tasks.dictionary_only import DictionaryOnlyTask
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.sequence_generator import SequenceGenerator

from fairseq_smoe.cli import params
from fairseq_smoe.decoding.joint_ctc import JointCtcAttentionEnsemble
from fairseq_smoe.routing import RoutingTable, guiding_token, lang_tag
from gpu_helpers import CUDA_ONLY, record

SIZES = {  # vocabulary, utterances, fbank frames (10 ms), beam, decoder steps
    "cuda": dict(vocab=40000, batch=8, frames=1200, beam=5, steps=20),
    "cpu": dict(vocab=600, batch=2, frames=160, beam=3, steps=4),
}


def _Task(vocab: int) -> DictionaryOnlyTask:
    return DictionaryOnlyTask(
        vocab, [guiding_token("transcribe"), guiding_token("translate"), lang_tag("en"), lang_tag("es")])


def test_joint_ctc_decoding_keeps_ctc_scores_per_source_utterance(device):
    size = SIZES[device]
    task = _Task(size["vocab"])
    d = task.target_dictionary
    torch.manual_seed(0)
    args = params.model_args("s2t_encdec_smoe_s", RoutingTable(), dict(dropout=0.0, ctc_weight=0.3))
    model = ARCH_MODEL_REGISTRY["s2t_encdec_smoe_s"].build_model(args, task).to(device).eval()
    assert model.encoder.ctc_proj is not None
    B, T = size["batch"], size["frames"]
    g = torch.Generator().manual_seed(0)
    sample = {"net_input": {
        "src_tokens": torch.randn(B, T, 80, generator=g).to(device),
        "src_lengths": torch.full((B,), T).to(device),
        "encoder_route_ids": torch.ones(B, dtype=torch.long, device=device),  # wb
        "decoder_route_ids": torch.zeros(B, dtype=torch.long, device=device),  # transcribe
    }}
    prefix = torch.tensor([[d.index(guiding_token("transcribe")), d.index(lang_tag("en"))]] * B, device=device)
    guiding = RoutingTable().guiding_token_ids(d)
    gen_kwargs = dict(beam_size=size["beam"], max_len_a=0, max_len_b=size["steps"] + 2, min_len=size["steps"] + 2)

    def peak(generator):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if device == "cuda" else 0
        with torch.no_grad():
            hypos = generator.generate([model], sample, prefix_tokens=prefix)
        assert len(hypos) == B and all(len(h) == size["beam"] for h in hypos)
        assert all(torch.isfinite(h[0]["score"]) for h in hypos)
        return (torch.cuda.max_memory_allocated() - before) if device == "cuda" else 0

    plain = peak(SequenceGenerator([model], d, **gen_kwargs))
    ensemble = JointCtcAttentionEnsemble([model], d, 0.3, 30, guiding)
    ensemble.prefix_len = prefix.size(1)
    joint = peak(SequenceGenerator(ensemble, d, **gen_kwargs))
    if device != "cuda":
        pytest.skip(CUDA_ONLY.format(what="torch.cuda.max_memory_allocated"))
    frames = model.encoder.subsample.get_out_seq_lens_tensor(torch.tensor([T])).item() \
        if hasattr(model.encoder, "subsample") else T // 4
    per_source = frames * B * size["vocab"] * 4  # T' x B x V fp32
    per_row = per_source * size["beam"]  # the old layout, before its copies
    figures = {**size, "encoder_frames": frames, "plain_peak_MB": round(plain / 2**20, 1),
               "joint_peak_MB": round(joint / 2**20, 1), "joint_extra_MB": round((joint - plain) / 2**20, 1),
               "ctc_per_source_MB": round(per_source / 2**20, 1), "ctc_per_hypothesis_row_MB": round(per_row / 2**20, 1)}
    record("joint_ctc_memory", figures)
    assert joint - plain <= 3 * per_source, figures
    assert joint - plain < per_row, figures  # less than one copy of the per-row layout
