"""Device-to-host transfers per training step: none for routing in S-MoE and dense models, one per switch layer for
the learned gate.

On a GPU every read of a device tensor's values on the host (``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``,
``nonzero``, ``unique``, ``bincount`` ...) waits for all kernels queued before it. This machine has no GPU, so
:class:`HostSyncCounter` models device placement on the CPU: a tensor is on the "device" unless it was made on the
host during the step, i.e. by a factory given no device (``torch.tensor(...)``, ``torch.as_tensor(numpy)``) or by
``.cpu()``, or computed only from such tensors (shapes too: ``torch._shape_as_tensor``). Everything the collater
made counts as device data, as it is after fairseq's ``move_to_cuda``; ``.to(d)`` with a device object (code takes
it from a device tensor, ``ids.device``) gives a device tensor, as it would on a GPU. A host read of a device tensor
is one transfer, attributed to the innermost frame outside torch: ``fairseq_smoe`` (the plugin) or fairseq.
"""

import pickle
import traceback
import weakref
from collections import Counter

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from fairseq import utils as fairseq_utils
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.sequence_generator import SequenceGenerator

from fairseq_smoe.cli import params
from fairseq_smoe.criterions.label_smoothed_cross_entropy_moe import LabelSmoothedCrossEntropyMoECriterion
from fairseq_smoe.models.s2t_smoe import DECODER_ROUTE_KEY, DECODER_SINGLE_ROUTE_KEY
from fairseq_smoe.routing import RouteBatch, RoutePlan
from fairseq_smoe.modules.switch_layer import SwitchLinear

T = torch.Tensor
# host reads of a tensor's values: each waits for the device (bincount and nonzero/unique read sizes or bounds)
HOST_READS = {T.item, T.tolist, T.cpu, T.numpy, T.__bool__, T.__int__, T.__float__, T.__index__, T.__complex__,
              torch.nonzero, T.nonzero, torch.unique, T.unique, torch.unique_consecutive, torch.masked_select,
              T.masked_select, torch.bincount, T.bincount, torch.repeat_interleave, T.repeat_interleave}


def _tensors(x, out):
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _tensors(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _tensors(y, out)
    return out


def _names_host(func, args, kwargs) -> bool:
    """``.cpu()`` or ``.to("cpu")``: an explicit move to the host."""
    if func is T.cpu:
        return True
    targets = list(args[1:]) + [kwargs.get("device")]
    return func is T.to and any(isinstance(a, str) and a.startswith("cpu") for a in targets)


class HostSyncCounter(TorchFunctionMode):
    """Counts host reads of device tensors (see the module docstring for how the device is modelled)."""

    def __init__(self):
        super().__init__()
        self._host = {}  # id -> weakref of the host tensors made so far
        self.transfers = []  # (op name, "plugin" | "fairseq" | "other", innermost frame outside torch)

    def on_device(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is None or ref() is not t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors(args, []) + _tensors(kwargs, [])
        device_inputs = [t for t in inputs if self.on_device(t)]
        to_host = _names_host(func, args, kwargs)
        if device_inputs and (
            func in HOST_READS or to_host
            or (func is T.__getitem__ and any(t.dtype == torch.bool and self.on_device(t)
                                              for t in _tensors(args[1:], [])))  # boolean-mask indexing
        ):
            self.transfers.append((getattr(func, "__name__", str(func)),) + self._where())
        out = func(*args, **kwargs)
        if to_host and device_inputs and out is device_inputs[0]:
            out = out.clone()  # on a GPU a new host tensor; on the CPU .cpu() returns its input
        if to_host or func is torch._shape_as_tensor:
            host = True
        elif func in (T.to, T.cuda):
            host = not device_inputs and not any(
                isinstance(a, (torch.device, torch.Tensor)) for a in list(args[1:]) + [kwargs.get("device")])
        elif inputs:
            host = not device_inputs
        else:  # a factory: on the host unless given a device
            host = kwargs.get("device") is None
        if host:
            for t in _tensors(out, []):
                self._host[id(t)] = weakref.ref(t)
        return out

    @staticmethod
    def _where():
        for frame in reversed(traceback.extract_stack()[:-3]):
            path = frame.filename.replace("\\", "/")
            if "/torch/" in path or path.endswith("test_host_transfers.py") or "/contextlib.py" in path:
                continue
            where = f"{path.split('/')[-1]}:{frame.lineno} {frame.name}"
            if "/fairseq_smoe/" in path:
                return "plugin", where
            if "/fairseq/" in path:
                return "fairseq", where
            return "other", where
        return "other", "?"

    def count(self, who: str) -> int:
        return sum(w == who for _, w, _ in self.transfers)

    def summary(self) -> str:
        return "\n".join(f"{n} x {op} in {who}: {where}" for (op, who, where), n in Counter(self.transfers).items())


# fairseq's own host reads in every S2T training step (not route work; outside this plugin):
# lengths_to_padding_mask's max().item(), the encoder's `encoder_padding_mask.any()` and the decoder's
# `prev_output_tokens.eq(pad).any()`
FAIRSEQ_READS_PER_STEP = 3


@pytest.fixture(scope="module")
def task(train_task):
    return train_task


def collated(task, kind: str):
    """A batch from the real collater: one route pair (nb, translate), or all four route pairs."""
    ds = task.datasets["train"]
    enc, dec = ds.encoder_routes, ds.decoder_routes
    if kind == "mixed":
        idx = [int(np.flatnonzero((enc == e) & (dec == d))[0]) for e in (0, 1) for d in (0, 1)]
    else:
        idx = [int(i) for i in np.flatnonzero((enc == 1) & (dec == 1))[:4]]
    return ds.collater([ds[i] for i in idx])


def build(task, arch):
    torch.manual_seed(0)
    args = params.model_args(arch, task.routing_table if hasattr(task, "routing_table") else params.RoutingTable(),
                             dict(dropout=0.0))
    model = ARCH_MODEL_REGISTRY[arch].build_model(args, task)
    return model, LabelSmoothedCrossEntropyMoECriterion(task, False, 0.1)


def training_step(model, criterion, sample) -> HostSyncCounter:
    with HostSyncCounter() as counter:
        loss, _, _ = criterion(model, sample)
        loss.backward()
    return counter


@pytest.mark.parametrize("kind", ["one_route", "mixed"])
@pytest.mark.parametrize("arch", ["s2t_smoe_base_xs", "s2t_dec_smoe_xs", "s2t_encdec_smoe_xs"])
def test_a_training_step_reads_no_route_id_back_from_the_device(task, arch, kind):
    model, criterion = build(task, arch)
    sample = collated(task, kind)
    assert isinstance(sample["net_input"]["route_plan"], RoutePlan)
    counter = training_step(model, criterion, sample)
    assert counter.count("plugin") == 0, counter.summary()
    assert counter.count("fairseq") == FAIRSEQ_READS_PER_STEP, counter.summary()
    assert counter.count("other") == 0, counter.summary()


@pytest.mark.parametrize("kind,expected", [("one_route", 2), ("mixed", 2)])
def test_without_the_plan_each_id_tensor_is_copied_to_the_host_once_before_the_encoder(task, kind, expected):
    """Calls with the id tensors only (benchmarks, export, tests) still work: one copy of each, no more."""
    model, criterion = build(task, "s2t_encdec_smoe_xs")
    sample = collated(task, kind)
    del sample["net_input"]["route_plan"]
    counter = training_step(model, criterion, sample)
    assert counter.count("plugin") == expected, counter.summary()
    assert {op for op, who, _ in counter.transfers if who == "plugin"} == {"cpu"}


def test_a_dense_model_does_no_route_work_even_without_the_plan(task, monkeypatch):
    made = []
    monkeypatch.setattr(RouteBatch, "__init__", lambda self, *a, **k: made.append(a))
    model, criterion = build(task, "s2t_smoe_base_xs")
    sample = collated(task, "mixed")
    del sample["net_input"]["route_plan"]
    counter = training_step(model, criterion, sample)
    assert counter.count("plugin") == 0 and made == [], counter.summary()
    out = model.encoder(**{k: v for k, v in sample["net_input"].items() if k != "prev_output_tokens"})
    assert out[DECODER_ROUTE_KEY] == [] and out[DECODER_SINGLE_ROUTE_KEY] == []


def test_the_learned_gate_has_device_decided_routes_so_reads_at_least_once_per_switch_layer(task):
    model, criterion = build(task, "s2t_encdec_lmoe_xs")
    switch_layers = sum(isinstance(m, SwitchLinear) and m.role == "fc1" for m in model.modules())
    assert switch_layers == 6 + 3
    counter = training_step(model, criterion, collated(task, "mixed"))
    plugin = Counter(op for op, who, _ in counter.transfers if who == "plugin")
    # the split sizes (tolist) once per switch layer; today bincount reads the ids' bounds too (see the next test)
    assert plugin["tolist"] == switch_layers, counter.summary()
    assert counter.count("fairseq") == FAIRSEQ_READS_PER_STEP, counter.summary()


def test_the_learned_gate_reads_exactly_once_per_switch_layer(task):
    model, criterion = build(task, "s2t_encdec_lmoe_xs")
    switch_layers = sum(isinstance(m, SwitchLinear) and m.role == "fc1" for m in model.modules())
    counter = training_step(model, criterion, collated(task, "mixed"))
    assert counter.count("plugin") == switch_layers, counter.summary()


@pytest.mark.parametrize("kind,per_step", [("one_route", 0), ("mixed", 1)])
def test_beam_search_reads_no_route_id_per_step_for_one_route_batches(task, kind, per_step):
    """A mixed batch's rows are reordered on the device by beam search: one copy of its decoder ids per step."""
    model, _ = build(task, "s2t_encdec_smoe_xs")
    model.eval()
    sample = collated(task, kind)
    net_input = {k: v for k, v in sample["net_input"].items() if k != "prev_output_tokens"}
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_a=0, max_len_b=6, min_len=6)
    with torch.no_grad(), HostSyncCounter() as counter:
        hypos = gen.generate([model], {"net_input": net_input})
    steps = 6 + 1
    assert all(len(h[0]["tokens"]) == steps for h in hypos)
    assert counter.count("plugin") == per_step * steps, counter.summary()


def test_the_plan_stays_on_the_host_through_fairseq_and_ddp_input_moving_and_pickles(task):
    from torch.distributed.utils import _recursive_to

    sample = collated(task, "mixed")
    plan = sample["net_input"]["route_plan"]
    assert plan.encoder.tolist() == sample["net_input"]["encoder_route_ids"].tolist()
    assert plan.decoder.tolist() == sample["net_input"]["decoder_route_ids"].tolist()
    moved = fairseq_utils.apply_to_sample(lambda t: t.clone(), sample)  # what move_to_cuda does to a sample
    assert moved["net_input"]["route_plan"] is plan
    (kwargs,) = _recursive_to((sample["net_input"],), torch.device("cpu"), False)  # DDP's input moving
    assert kwargs[0]["route_plan"] is plan if isinstance(kwargs, tuple) else kwargs["route_plan"] is plan
    again = pickle.loads(pickle.dumps(plan))
    assert again.encoder.tolist() == plan.encoder.tolist() and again.decoder.tolist() == plan.decoder.tolist()


def test_the_plan_survives_a_data_loader_worker_sending_the_batch(task):
    """Workers pickle batches with torch's reductions, which move each tensor's storage to shared memory and free
    the old one: a plan viewing the id tensors' memory (``tensor.numpy()``) read freed memory (fairseq-generate,
    whose default is one worker, failed with route ids like 139841092721352)."""
    import torch.multiprocessing  # noqa: F401  (registers torch's reductions with ForkingPickler)
    from multiprocessing.reduction import ForkingPickler

    bad = []
    for kind in ("mixed", "one_route") * 5:
        sample = collated(task, kind)
        expected = sample["net_input"]["encoder_route_ids"].tolist(), sample["net_input"]["decoder_route_ids"].tolist()
        buf = ForkingPickler.dumps(sample)
        churn = [torch.randn(50_000) for _ in range(4)]  # reuse freed memory, as the worker's next batch does
        plan = pickle.loads(buf)["net_input"]["route_plan"]
        bad += [(plan.encoder.tolist(), plan.decoder.tolist())] if (plan.encoder.tolist(),
                                                                    plan.decoder.tolist()) != expected else []
        del churn
    assert bad == []
    assert sample["net_input"]["route_plan"].encoder.flags.owndata


def test_a_plan_for_another_batch_is_refused(task):
    model, criterion = build(task, "s2t_encdec_smoe_xs")
    sample = collated(task, "mixed")
    sample["net_input"]["route_plan"] = RoutePlan([0, 1], [0, 1])
    with pytest.raises(ValueError, match="route_plan holds the routes of 2 samples for a batch of 4"):
        criterion(model, sample)
    with pytest.raises(ValueError, match=r"one encoder and one decoder route per sample, got shapes \(2,\) and \(3,\)"):
        RoutePlan([0, 1], [0, 1, 1])
