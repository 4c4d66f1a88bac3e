import copy
from argparse import Namespace

import pytest
import torch
from torch import nn

from fairseq.models.transformer import TransformerConfig
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayer
from fairseq.sequence_generator import EnsembleModel

from fairseq_smoe.cli import params
from fairseq_smoe.modules.expert_layer import ExpertLinear, SMoETransformerDecoderLayer, SMoETransformerEncoderLayer
from fairseq_smoe.routing import RouteContext, RoutingTable
from fairseq_smoe.tasks.dictionary_only import DictionaryOnlyTask


def layer_args(**kw):
    args = params.model_args("s2t_encdec_smoe_xs", RoutingTable(), dict(dropout=0.0, **kw))
    return args


def copy_dense_into_expert(dense_layer, smoe_layer, expert):
    smoe_layer.load_state_dict(
        {k: v for k, v in dense_layer.state_dict().items() if not k.startswith(("fc1", "fc2"))}, strict=False
    )
    with torch.no_grad():
        for fc in ("fc1", "fc2"):
            getattr(smoe_layer, fc).weight[expert].copy_(getattr(dense_layer, fc).weight)
            getattr(smoe_layer, fc).bias[expert].copy_(getattr(dense_layer, fc).bias)


def test_one_expert_equals_fairseq_dense_encoder_layer():
    torch.manual_seed(0)
    args = layer_args()
    dense = TransformerEncoderLayer(args).eval()
    ctx = RouteContext(1, "encoder")
    smoe = SMoETransformerEncoderLayer(args, 1, ctx).eval()
    copy_dense_into_expert(dense, smoe, 0)
    x = torch.randn(7, 3, args.encoder_embed_dim)
    with ctx.use(torch.zeros(3, dtype=torch.long), 3):
        assert torch.allclose(smoe(x, None), dense(x, None), atol=1e-6)


def test_each_expert_is_a_full_dense_decoder_ffn():
    torch.manual_seed(0)
    cfg = TransformerConfig.from_namespace(layer_args())
    dense = TransformerDecoderLayerBase(cfg).eval()
    ctx = RouteContext(2, "decoder")
    smoe = SMoETransformerDecoderLayer(cfg, False, 2, ctx).eval()
    copy_dense_into_expert(dense, smoe, 1)
    x, enc = torch.randn(5, 2, cfg.decoder.embed_dim), torch.randn(9, 2, cfg.decoder.embed_dim)
    with ctx.use(torch.tensor([1, 1]), 2):
        out, _, _ = smoe(x, enc, None)
    ref, _, _ = dense(x, enc, None)
    assert torch.allclose(out, ref, atol=1e-6)


def test_experts_are_independent_parameters():
    ctx = RouteContext(2, "encoder")
    fc = ExpertLinear(8, 16, 2, ctx, "fc1")
    assert fc.weight.shape == (2, 16, 8) and fc.bias.shape == (2, 16)
    assert not torch.equal(fc.weight[0], fc.weight[1])


def test_role_is_fc1_or_fc2():
    with pytest.raises(ValueError, match=r"role must be one of \('fc1', 'fc2'\), got 'standalone'"):
        ExpertLinear(4, 6, 2, RouteContext(2, "encoder"), "standalone")


class CallLog:
    def __init__(self, module):
        self.calls = []
        self.original = module.expert_forward
        module.expert_forward = self

    def __call__(self, x, expert):
        self.calls.append((expert, x.shape[1]))
        return self.original(x, expert)


def expert_ffn(num_experts, ctx, d_in=4, d_hidden=6, d_out=5):
    """An expert FFN's two maps, as the S-MoE layers build them (the activation left out: it acts row-wise)."""
    return ExpertLinear(d_in, d_hidden, num_experts, ctx, "fc1"), ExpertLinear(d_hidden, d_out, num_experts, ctx, "fc2")


@pytest.mark.parametrize("role", ["fc1", "fc2"])
def test_single_route_batch_calls_only_that_expert_on_the_whole_batch(role):
    ctx = RouteContext(3, "encoder")
    fc = ExpertLinear(4, 6, 3, ctx, role)
    log = CallLog(fc)
    x = torch.randn(5, 4, 4)
    with ctx.use(torch.tensor([2, 2, 2, 2]), 4):
        y = fc(x)
    assert log.calls == [(2, 4)]
    assert torch.allclose(y, x @ fc.weight[2].T + fc.bias[2])


def test_mixed_batch_never_runs_an_unused_expert_and_puts_rows_back(monkeypatch):
    from fairseq_smoe.modules import expert_layer

    spans_run = []
    original = expert_layer.grouped_linear

    def logged(x, weight, bias, spans):
        spans_run.append([(e, hi - lo) for e, lo, hi in spans])
        return original(x, weight, bias, spans)

    monkeypatch.setattr(expert_layer, "grouped_linear", logged)
    ctx = RouteContext(3, "encoder")
    fc1, fc2 = expert_ffn(3, ctx)
    x = torch.randn(5, 4, 4)  # T x B x C
    ids = torch.tensor([2, 0, 2, 0])
    with ctx.use(ids, 4):
        y = fc2(fc1(x))
    # fc1 and fc2 each run experts 0 and 2 on their two batch rows (5 steps each); expert 1 never
    assert spans_run == [[(0, 10), (2, 10)], [(0, 10), (2, 10)]]
    assert y.shape == (5, 4, 5)
    for b, e in enumerate(ids.tolist()):
        ref = (x[:, b] @ fc1.weight[e].T + fc1.bias[e]) @ fc2.weight[e].T + fc2.bias[e]
        assert torch.allclose(y[:, b], ref, atol=1e-5)


@pytest.mark.parametrize("ids", [[0, 0], [0, 2, 2]], ids=["one-route", "mixed"])
def test_unused_expert_gets_zero_not_missing_gradient(ids):
    ctx = RouteContext(3, "encoder")
    fc1, fc2 = expert_ffn(3, ctx)
    with ctx.use(torch.tensor(ids), len(ids)):
        fc2(fc1(torch.randn(3, len(ids), 4))).sum().backward()
    for fc in (fc1, fc2):
        assert fc.weight.grad is not None and fc.bias.grad is not None
        assert fc.weight.grad[1].abs().sum() == 0 and fc.bias.grad[1].abs().sum() == 0
        for used in set(ids):
            assert fc.weight.grad[used].abs().sum() > 0


def test_expert_layer_refuses_to_run_without_routes():
    fc = ExpertLinear(4, 6, 2, RouteContext(2, "decoder"), "fc1")
    with pytest.raises(RuntimeError, match="no routes"):
        fc(torch.randn(1, 1, 4))


# ------------------------------------------------------------------------------------------------ whole model
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    args = params.model_args("s2t_encdec_smoe_xs", RoutingTable(), dict(dropout=0.0, encoder_layers=2, decoder_layers=2))
    from fairseq.models import ARCH_MODEL_REGISTRY

    return ARCH_MODEL_REGISTRY["s2t_encdec_smoe_xs"].build_model(args, DictionaryOnlyTask(60)).eval()


def batch(B=4, T=40, U=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(B, T, 80, generator=g)
    lengths = torch.full((B,), T)
    prev = torch.randint(4, 60, (B, U), generator=g)
    prev[:, 0] = 2
    return src, lengths, prev


def test_mixed_batch_equals_each_row_alone(model):
    src, lengths, prev = batch()
    enc, dec = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1, 0, 0])
    with torch.no_grad():
        full, _ = model(src, lengths, prev, enc, dec)
        for i in range(4):
            alone, _ = model(src[i:i + 1], lengths[i:i + 1], prev[i:i + 1], enc[i:i + 1], dec[i:i + 1])
            assert torch.allclose(full[i], alone[0], atol=1e-5)


def test_routes_change_the_output(model):
    src, lengths, prev = batch(B=1)
    with torch.no_grad():
        outs = {(e, d): model(src, lengths, prev, torch.tensor([e]), torch.tensor([d]))[0]
                for e in (0, 1) for d in (0, 1)}
    assert not torch.allclose(outs[(0, 0)], outs[(1, 0)])
    assert not torch.allclose(outs[(0, 0)], outs[(0, 1)])


def test_model_without_route_ids_fails_clearly(model):
    src, lengths, prev = batch(B=2)
    with pytest.raises(ValueError, match="no encoder route ids"):
        model(src, lengths, prev)


def test_incremental_decoding_keeps_each_rows_task_route_after_beam_reorder(model):
    """fairseq feeds the decoder one token at a time and reorders rows between steps (beam search)."""
    src, lengths, prev = batch(B=2, U=5)
    enc, dec = torch.tensor([0, 1]), torch.tensor([0, 1])
    with torch.no_grad():
        full, _ = model(src, lengths, prev, enc, dec)
        ens = EnsembleModel([model])
        enc_out = ens.forward_encoder({"src_tokens": src, "src_lengths": lengths,
                                       "encoder_route_ids": enc, "decoder_route_ids": dec})
        # beam of 2: rows [0, 0, 1, 1]; beams swap within a sentence, then sentence 0 finishes and its rows are
        # dropped, as fairseq's SequenceGenerator does
        order = torch.tensor([0, 0, 1, 1])
        enc_out = ens.reorder_encoder_out(enc_out, order)
        incremental = torch.jit.annotate(dict, {})
        ens.incremental_states = [incremental]
        tokens = prev.index_select(0, order)
        steps = [torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3]), torch.tensor([1, 0]), torch.tensor([0, 1]),
                 torch.tensor([1, 0])]
        for t, swap in enumerate(steps):
            lprobs, _ = ens.forward_decoder(tokens[:, : t + 1], enc_out, ens.incremental_states, temperature=1.0)
            expected = model.get_normalized_probs((full[:, t: t + 1], None), log_probs=True)[:, 0]
            assert torch.allclose(lprobs, expected.index_select(0, order), atol=1e-4), f"step {t}"
            model.decoder.reorder_incremental_state_scripting(incremental, swap)
            enc_out = ens.reorder_encoder_out(enc_out, swap)
            tokens = tokens.index_select(0, swap)
            order = order.index_select(0, swap)
        assert enc_out[0]["decoder_route_ids"][0].tolist() == dec.index_select(0, order).tolist()
