"""Mixed-route batches on the device's kernels (cuBLAS on a GPU): a batch mixing every (bandwidth, task) route pair
gives each row what that route pair's rows give when run alone (one-route batches take the dense layers' path, mixed
batches the grouped expert matmuls). fp32 with TF32 off: tight tolerance; bf16 autocast: looser, and still far
below what a row routed to the wrong expert gives (checked, so the comparison can fail)."""

import contextlib

import pytest
import torch

from fairseq.models import ARCH_MODEL_REGISTRY

from fairseq_smoe.cli import params
from fairseq_smoe.tasks.dictionary_only import DictionaryOnlyTask
from fairseq_smoe.routing import RoutingTable
from gpu_helpers import NO_BF16, native_bf16, record

ENC = [0, 1, 1, 0, 1, 0, 0, 1]  # bandwidth route per row (nb / wb)
DEC = [1, 1, 0, 0, 0, 1, 0, 1]  # task route per row (transcribe / translate)
# (max |mixed - alone| / max |alone|) allowed
TOLERANCE = {"fp32": 1e-5, "bf16": 4e-2}


@contextlib.contextmanager
def no_tf32():
    """cuBLAS and cuDNN compute fp32 in TF32 by default on Ampere and later for convolutions: a 1e-3 rounding that
    depends on the batch shape. fp32 equivalence is checked with true fp32 kernels."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build(device):
    torch.manual_seed(0)
    args = params.model_args("s2t_encdec_smoe_xs", RoutingTable(), dict(dropout=0.0, encoder_layers=2,
                                                                         decoder_layers=1))
    model = ARCH_MODEL_REGISTRY["s2t_encdec_smoe_xs"].build_model(args, DictionaryOnlyTask(60))
    # trained-like expert weights: each expert of a layer differs from its sibling
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3 or ".fc" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.to(device).eval()


def batch(device, B=len(ENC), T=48, U=7):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(B, T, 80, generator=g)
    # one length: fairseq's convolutional subsampler lets a row's last frames see the batch's padding, so a
    # shorter row run in a shorter batch differs there by design (dense models too), whatever the routing
    lengths = torch.full((B,), T)
    prev = torch.randint(4, 60, (B, U), generator=g)
    prev[:, 0] = 2
    return src.to(device), lengths.to(device), prev.to(device)


def forward(model, device, precision, src, lengths, prev, enc, dec):
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        out = model(src, lengths, prev, encoder_route_ids=torch.tensor(enc, device=device),
                    decoder_route_ids=torch.tensor(dec, device=device))[0]
    return out.float()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mixed_batch_rows_equal_each_route_pair_run_alone(device, precision):
    if precision == "bf16" and not native_bf16(device):
        pytest.skip(NO_BF16)
    model = build(device)
    src, lengths, prev = batch(device)
    with no_tf32():
        mixed = forward(model, device, precision, src, lengths, prev, ENC, DEC)
        alone = torch.empty_like(mixed)
        pairs = sorted(set(zip(ENC, DEC)))
        assert len(pairs) == 4  # every route pair is in the mixed batch
        for pair in pairs:
            rows = [i for i, p in enumerate(zip(ENC, DEC)) if p == pair]
            idx = torch.tensor(rows, device=device)
            alone[idx] = forward(model, device, precision, src[idx], lengths[idx], prev[idx],
                                 [pair[0]] * len(rows), [pair[1]] * len(rows))
        # the same rows through the other experts: what a routing mistake would give
        wrong = forward(model, device, precision, src, lengths, prev, [1 - e for e in ENC], [1 - d for d in DEC])
    scale = alone.abs().max().item()
    diff = (mixed - alone).abs().max().item() / scale
    misrouted = (wrong - alone).abs().max().item() / scale
    record(f"mixed_route_{precision}", {"device": device, "max_rel_diff": diff, "misrouted_rel_diff": misrouted,
                                        "tolerance": TOLERANCE[precision]})
    assert diff <= TOLERANCE[precision], f"{precision}: mixed-route rows differ by {diff:.2e} of the output scale"
    assert misrouted > 10 * TOLERANCE[precision], f"routing mistakes would go unnoticed ({misrouted:.2e})"
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
