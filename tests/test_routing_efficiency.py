"""What keeps S-MoE at the dense model's cost: routes grouped once per batch, no gather/scatter for one-route batches,
one gather and one scatter per FFN for mixed batches, no per-step route work in one-route beam search."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.sequence_generator import SequenceGenerator

from fairseq_smoe.cli import params
from fairseq_smoe.modules.expert_layer import GroupedLinear, SMoETransformerEncoderLayer, grouped_linear
from fairseq_smoe.routing import RouteBatch, RouteContext, RoutingTable
from fairseq_smoe.tasks.dictionary_only import DictionaryOnlyTask

GATHER_SCATTER = {"index_select", "index_copy_", "index_copy", "gather", "scatter", "scatter_", "index_put_",
                  "take_along_dim", "__getitem__"}


class CountCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))

    def count(self, names):
        return sum(n in names for n in self.names)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    args = params.model_args("s2t_encdec_smoe_xs", RoutingTable(), dict(dropout=0.0))
    return ARCH_MODEL_REGISTRY["s2t_encdec_smoe_xs"].build_model(args, DictionaryOnlyTask(60)).eval()


def batch(B=4, T=40, U=6):
    g = torch.Generator().manual_seed(0)
    prev = torch.randint(4, 60, (B, U), generator=g)
    prev[:, 0] = 2
    return torch.randn(B, T, 80, generator=g), torch.full((B,), T), prev


@pytest.fixture
def route_batches(monkeypatch):
    """Counts RouteBatch groupings computed from route ids (the host-side work)."""
    made = []
    original = RouteBatch.__init__

    def counting_init(self, ids, host_ids=None):
        made.append(ids.numel())
        original(self, ids, host_ids)

    monkeypatch.setattr(RouteBatch, "__init__", counting_init)
    return made


def test_routes_are_grouped_once_per_encoder_and_decoder_not_per_layer(model, route_batches):
    src, lengths, prev = batch()
    with torch.no_grad():
        model(src, lengths, prev, torch.tensor([0, 1, 1, 0]), torch.tensor([1, 0, 1, 0]))
    assert len(model.encoder.transformer_layers) == 6 and len(model.decoder.layers) == 3
    assert route_batches == [4, 4]  # encoder routes once, decoder routes once


def test_one_route_batch_runs_the_dense_layers_torch_ops(model):
    """Besides picking the expert's weight slices, a one-route layer calls exactly what fairseq's dense layer calls."""
    from fairseq.modules.transformer_layer import TransformerEncoderLayer

    layer = model.encoder.transformer_layers[0]
    dense = TransformerEncoderLayer(params.model_args("s2t_smoe_base_xs", RoutingTable(), dict(dropout=0.0))).eval()
    x = torch.randn(10, 4, 128)
    with model.encoder.route_context.use(torch.tensor([1, 1, 1, 1]), 4), torch.no_grad(), CountCalls() as calls:
        layer(x, None)
    with torch.no_grad(), CountCalls() as dense_calls:
        dense(x, None)
    picked = [n for n in calls.names if n == "__getitem__"]
    assert len(picked) == 4  # weight[e] and bias[e] of fc1 and fc2
    assert [n for n in calls.names if n != "__getitem__"] == [n for n in dense_calls.names if n != "__getitem__"]
    assert calls.count(GATHER_SCATTER - {"__getitem__"}) == 0


def test_mixed_batch_gathers_once_and_scatters_once_per_ffn(model):
    layer = model.encoder.transformer_layers[0]
    assert isinstance(layer, SMoETransformerEncoderLayer)
    x = torch.randn(10, 4, 128)
    ids = torch.tensor([1, 0, 1, 0])
    with model.encoder.route_context.use(ids, 4), torch.no_grad(), CountCalls() as calls:
        out = layer(x, None)
    # fc1: one index_select gathering the rows by route; fc2: one index_select putting them back
    assert calls.count({"index_select"}) == 2
    assert calls.count({"index_copy_", "index_copy", "gather", "scatter", "scatter_", "index_put_"}) == 0
    for b in range(4):
        with model.encoder.route_context.use(ids[b:b + 1], 1), torch.no_grad():
            alone = layer(x[:, b:b + 1], None)
        assert torch.allclose(out[:, b:b + 1], alone, atol=1e-5)


def test_mixed_batch_gradients_equal_the_sum_of_each_rows_gradients():
    torch.manual_seed(0)
    args = params.model_args("s2t_encdec_smoe_xs", RoutingTable(), dict(dropout=0.0, encoder_layers=2,
                                                                         decoder_layers=1))
    model = ARCH_MODEL_REGISTRY["s2t_encdec_smoe_xs"].build_model(args, DictionaryOnlyTask(60))
    src, lengths, prev = batch()
    enc, dec = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1, 0, 0])
    model(src, lengths, prev, enc, dec)[0].sum().backward()
    together = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for i in range(4):
        s = slice(i, i + 1)
        model(src[s], lengths[s], prev[s], enc[s], dec[s])[0].sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(together[n], p.grad, atol=1e-4, rtol=1e-4), n
    fc1 = model.encoder.transformer_layers[0].fc1
    assert fc1.weight.grad[0].abs().sum() > 0 and fc1.weight.grad[1].abs().sum() > 0


def test_route_batch_sorts_rows_by_route_once():
    rb = RouteBatch(torch.tensor([1, 0, 1, 2, 0]))
    assert rb.perm.tolist() == [1, 4, 0, 2, 3]
    assert rb.spans == [(0, 0, 2), (1, 2, 4), (2, 4, 5)]
    assert rb.perm[rb.inverse].tolist() == [0, 1, 2, 3, 4]
    one = RouteContext(3, "decoder")
    with pytest.raises(ValueError, match=r"out of range \[0, 3\): 3"):
        with one.use(torch.tensor([3, 3]), 2, single=3):
            pass


@pytest.mark.parametrize("dec_routes,expected_groupings", [([1, 1], 1), ([0, 1], None)])
def test_one_route_beam_search_does_no_route_work_per_step(model, route_batches, dec_routes, expected_groupings):
    src, lengths, _ = batch(B=2)
    net_input = {"src_tokens": src, "src_lengths": lengths, "encoder_route_ids": torch.tensor([0, 0]),
                 "decoder_route_ids": torch.tensor(dec_routes)}
    task = DictionaryOnlyTask(60)
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_a=0, max_len_b=6, min_len=6)
    with torch.no_grad():
        hypos = gen.generate([model], {"net_input": net_input})
    assert len(hypos) == 2 and all(len(h[0]["tokens"]) == 7 for h in hypos)
    if expected_groupings is not None:
        # only the encoder groups routes; the 7 decoder steps reuse the one-route flag kept through reordering
        assert len(route_batches) == expected_groupings
    else:
        # a mixed batch is regrouped at every step, after beam search reorders its rows
        assert len(route_batches) == 1 + 7


def test_single_route_flag_survives_reordering(model):
    src, lengths, _ = batch(B=2)
    with torch.no_grad():
        out = model.encoder(src, lengths, torch.tensor([0, 1]), torch.tensor([1, 1]))
    assert out[routing_key()][0].item() == 1 and out[routing_key()][0].device.type == "cpu"
    re = model.encoder.reorder_encoder_out(out, torch.tensor([1, 1, 0, 0]))
    assert re[routing_key()][0].item() == 1 and re["decoder_route_ids"][0].tolist() == [1, 1, 1, 1]
    with torch.no_grad():
        mixed = model.encoder(src, lengths, torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert mixed[routing_key()] == []


def routing_key():
    from fairseq_smoe.models.s2t_smoe import DECODER_SINGLE_ROUTE_KEY

    return DECODER_SINGLE_ROUTE_KEY



def test_grouped_linear_matches_per_expert_linear_maps_and_their_gradients():
    torch.manual_seed(0)
    x = torch.randn(7, 4, dtype=torch.double, requires_grad=True)
    w = torch.randn(3, 5, 4, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.double, requires_grad=True)
    spans = [(2, 0, 3), (0, 3, 6)]  # expert 1 unused, row 6 in no span
    out = grouped_linear(x, w, b, spans)
    ref = torch.cat([x[0:3] @ w[2].T + b[2], x[3:6] @ w[0].T + b[0], torch.zeros(1, 5, dtype=torch.double)])
    assert torch.allclose(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(w.grad[1], torch.zeros(5, 4, dtype=torch.double))
    assert torch.equal(b.grad[1], torch.zeros(5, dtype=torch.double))
    assert torch.allclose(w.grad[2], g[0:3].T @ x[0:3]) and torch.allclose(b.grad[0], g[3:6].sum(0))
    assert torch.equal(x.grad[6], torch.zeros(4, dtype=torch.double))
    assert torch.autograd.gradcheck(lambda x, w, b: GroupedLinear.apply(x, w, b, spans), (x, w, b))
    with torch.no_grad():  # inference skips autograd but computes the same
        assert torch.allclose(grouped_linear(x, w, b, spans), ref)
