"""Host-device synchronizations of one training step (forward, loss, backward) per model, counted by CUDA itself
with ``torch.cuda.set_sync_debug_mode("warn")`` on a batch the task's collater made (with its host-side route plan),
moved to the GPU as fairseq's trainer does. Budget: none for the dense Base and for S-MoE (one-route and mixed
batches: route ids reach the host from the collater, not from the device), one per switch layer for the learned
gate (its per-expert token counts). Every sync is a pipeline bubble: the host waits for the queued kernels.

The CPU rehearsal runs the same steps (so the test's own code is checked) and skips the count, which only CUDA
can take."""

import argparse
import traceback
import warnings

import pytest
import torch

from fairseq import utils
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

from fairseq_smoe.cli import params
from fairseq_smoe.criterions.label_smoothed_cross_entropy_moe import LabelSmoothedCrossEntropyMoECriterion
from fairseq_smoe.tasks.speech_to_text_smoe import SpeechToTextSMoETask
from gpu_helpers import CUDA_ONLY, record

LAYERS = dict(encoder_layers=2, decoder_layers=1)
# (architecture, batch, host syncs allowed per training step)
CASES = {
    "base": ("s2t_smoe_base_xs", "one-route", 0),
    "smoe-one-route": ("s2t_encdec_smoe_xs", "one-route", 0),
    "smoe-mixed": ("s2t_encdec_smoe_xs", "mixed", 0),
    "lmoe": ("s2t_encdec_lmoe_xs", "one-route", LAYERS["encoder_layers"] + LAYERS["decoder_layers"]),
}


@pytest.fixture(scope="module")
def task(gpu_corpus):
    parser = argparse.ArgumentParser()
    SpeechToTextSMoETask.add_args(parser)
    args = parser.parse_args([str(gpu_corpus), "--config-yaml", "config.yaml"])
    args.seed = 1
    t = SpeechToTextSMoETask.setup_task(args)
    t.load_dataset("train")
    return t


def make_batch(task, kind: str, size: int = 8) -> dict:
    ds = task.datasets["train"]
    by_pair = {}
    for i in range(len(ds)):
        by_pair.setdefault((int(ds.encoder_routes[i]), int(ds.decoder_routes[i])), []).append(i)
    if kind == "one-route":
        rows = next(iter(by_pair.values()))[:size]
    else:  # rows of every route pair, interleaved
        rows = [i for group in zip(*by_pair.values()) for i in group][:size]
        assert len({(int(ds.encoder_routes[i]), int(ds.decoder_routes[i])) for i in rows}) == len(by_pair) == 4
    return ds.collater([ds[i] for i in rows])


class _Backward:
    """What FairseqTask.train_step asks of fairseq's optimizer wrapper."""

    def backward(self, loss):
        loss.backward()


def step(task, model, criterion, sample):
    model.zero_grad(set_to_none=True)
    task.train_step(sample, model, criterion, _Backward(), update_num=1)


def origin(stack) -> tuple:
    """Who asked for a sync: the innermost frame outside torch, as ``(plugin|fairseq|backward, "file:line")``.

    Syncs of autograd's backward kernels are replayed after ``loss.backward()`` returns, so they land on its caller."""
    for frame in reversed(stack):
        f = frame.filename.replace("\\", "/")
        if "/torch/" in f or f.endswith("/warnings.py") or frame.name in ("show", "count_syncs"):
            continue
        where = f"{frame.filename}:{frame.lineno}"
        if f == __file__:
            return ("backward" if frame.name == "backward" else "test"), where
        return ("plugin" if "/fairseq_smoe/" in f else "fairseq" if "/fairseq/" in f else "other"), where
    return "other", "?"


def count_syncs(fn) -> list:
    """``(origin, "file:line")`` of each host-device synchronization of ``fn()`` (CUDA's own sync debug mode)."""
    found = []

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message).lower():
            found.append(origin(traceback.extract_stack()[:-1]))

    torch.cuda.synchronize()
    with warnings.catch_warnings():  # restores showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_host_syncs_within_budget(device, task, case):
    arch, kind, budget = CASES[case]
    torch.manual_seed(0)
    args = params.model_args(arch, task.routing_table, dict(dropout=0.0, **LAYERS))
    model = task.build_model(args).to(device).train()
    if "lmoe" in arch:
        criterion = LabelSmoothedCrossEntropyMoECriterion(task, False, 0.1)
    else:
        criterion = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)
    sample = make_batch(task, kind)
    assert "route_plan" in sample["net_input"]  # the collater's host copy of the route ids
    if device == "cuda":
        sample = utils.move_to_cuda(sample)
    step(task, model, criterion, sample)  # warm-up: lazy CUDA/cuBLAS initialisation may sync once
    if device != "cuda":
        pytest.skip(CUDA_ONLY.format(what="torch.cuda.set_sync_debug_mode counts host syncs"))
    # the counter sees a sync, and tells who asked: one .item() here is one
    assert [kind for kind, _ in count_syncs(lambda: torch.ones(2, device="cuda").sum().item())] == ["test"]
    syncs = count_syncs(lambda: step(task, model, criterion, sample))
    by_origin = {k: [w for o, w in syncs if o == k] for k in ("plugin", "fairseq", "backward", "other")}
    record(f"syncs_{case}", {"arch": arch, "batch": kind, "budget_plugin": budget,
                             **{f"syncs_{k}": len(v) for k, v in by_origin.items()}, "where": syncs})
    # the budget is the plugin's: fairseq's S2T encoder reads the longest length once (lengths_to_padding_mask),
    # and some of torch's backward kernels (embedding) size their work on the host; both are reported, not ours
    assert len(by_origin["plugin"]) <= budget, \
        f"{case}: {len(by_origin['plugin'])} host syncs by the plugin in one training step (budget {budget}):\n" + \
        "\n".join(by_origin["plugin"])
