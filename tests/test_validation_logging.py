"""What the task logs per batch, as several processes need it: the same keys in the same order on every batch.

fairseq sums the logging outputs of all processes as ONE flat buffer whose layout comes from each rank's first
logging output (``Trainer._fast_stat_sync_sum``; its stand-in batches are zeroed but keep their keys). With
homogeneous batches two ranks decode different tasks at validation, and at the end of an epoch whose batch count is
not a multiple of the number of ranks one rank runs a stand-in batch (``ignore_grad``): if the keys differ, the
buffers differ in length and gloo aborts (``op.preamble.length <= op.nbytes``) or NCCL hangs. The end-to-end
2-process run is in tests/test_distributed.py; here the per-batch contract, in process, on synthetic audio.
"""

from argparse import Namespace

import numpy as np
import pytest
import torch

from fairseq import optim
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from fairseq.logging import metrics

from fairseq_smoe.checkpoint import safety as checkpoint_safety
from fairseq_smoe.cli import params
from fairseq_smoe.scoring import evaluation
from fairseq_smoe.criterions.label_smoothed_cross_entropy_asr_ctc import LabelSmoothedCrossEntropyAsrCtcCriterion
from fairseq_smoe.criterions.label_smoothed_cross_entropy_moe import LabelSmoothedCrossEntropyMoECriterion
from fairseq_smoe.routing import RoutingTable
from test_ctc import batch_of
from test_dataset import ROWS, make_task, write_corpus


def build(task, arch):
    torch.manual_seed(0)
    args = params.model_args(arch, RoutingTable(), {"ctc_weight": 0.3, "encoder_layers": 1, "decoder_layers": 1})
    return params.ARCH_MODEL_REGISTRY[arch].build_model(args, task)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    t = make_task(write_corpus(tmp_path_factory.mktemp("corpus"), ROWS), "--eval-max-len-b", "5")
    t.load_dataset("train")
    return t


def rows_of(task, which):
    ds = task.datasets["train"]
    return batch_of(ds, [i for i in range(len(ds)) if ds.tasks[i] == which])


CRITERIA = {
    "label_smoothed_cross_entropy": (LabelSmoothedCrossEntropyCriterion, "s2t_encdec_smoe_xs", {}),
    "label_smoothed_cross_entropy_asr_ctc": (LabelSmoothedCrossEntropyAsrCtcCriterion, "s2t_encdec_smoe_xs",
                                             {"ctc_weight": 0.3}),
    "label_smoothed_cross_entropy_moe/S-MoE": (LabelSmoothedCrossEntropyMoECriterion, "s2t_encdec_smoe_xs", {}),
    "label_smoothed_cross_entropy_moe/learned gate": (LabelSmoothedCrossEntropyMoECriterion, "s2t_encdec_lmoe_xs", {}),
}


def layout(log):
    """What decides fairseq's flat buffer: the keys, their order, and which values are tensors."""
    return [(k, torch.is_tensor(v)) for k, v in log.items()]


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_validation_batches_of_either_task_log_the_same_keys(task, name):
    cls, arch, kwargs = CRITERIA[name]
    model = build(task, arch)
    criterion = cls(task, False, 0.1, **kwargs)
    asr, st = rows_of(task, "asr"), rows_of(task, "st")
    _, _, asr_log = task.valid_step(asr, model, criterion)
    _, _, st_log = task.valid_step(st, model, criterion)
    assert layout(asr_log) == layout(st_log)
    for key in evaluation.WER_KEYS + evaluation.BLEU_KEYS + ("n_skipped",):
        assert key in asr_log
    # the zeros stand for the task a batch does not hold; the counts of the task it holds are real
    assert asr_log["_wer_words"] == sum(len(text.split()) for _, _, _, task_, _, text in ROWS if task_ == "asr")
    assert asr_log["_bleu_ref_len"] == 0 and all(asr_log[f"_bleu_totals_{i}"] == 0 for i in range(4))
    assert st_log["_wer_words"] == 0 and st_log["_wer_errors"] == 0 and st_log["_bleu_ref_len"] > 0


def reduced(task, logs):
    """(smoothed values, the meters' state as a checkpoint stores it, the BLEU count arrays) of ``logs``."""
    with metrics.aggregate(new_root=True) as agg:
        task.reduce_metrics(logs, LabelSmoothedCrossEntropyCriterion(task, False, 0.1))
        arrays = [agg[k].sum for k in ("_bleu_counts", "_bleu_totals") if k in agg]
        return agg.get_smoothed_values(), agg.state_dict(), arrays


def summed_like_all_reduce(logs):
    """One logging output as fairseq's all-reduce returns it: every value a float64 tensor."""
    return {k: torch.tensor(float(sum(log[k] for log in logs)), dtype=torch.double) for k in logs[0]}


def test_wer_and_bleu_are_reported_only_for_the_tasks_decoded(task, tmp_path):
    model = build(task, "s2t_encdec_smoe_xs")
    criterion = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)
    asr_log = task.valid_step(rows_of(task, "asr"), model, criterion)[2]
    st_log = task.valid_step(rows_of(task, "st"), model, criterion)[2]
    only_asr, _, _ = reduced(task, [asr_log])
    only_st, _, _ = reduced(task, [st_log])
    assert "wer" in only_asr and "bleu" not in only_asr
    assert "bleu" in only_st and "wer" not in only_st
    # two ranks, one per task: the sums come back as float64 tensors; the scores are those of one process
    both, state, arrays = reduced(task, [summed_like_all_reduce([asr_log, st_log])])
    one_process, _, _ = reduced(task, [asr_log, st_log])
    assert both["wer"] == one_process["wer"] == only_asr["wer"] and both["bleu"] == one_process["bleu"]
    # what lands in the checkpoint's metrics: integer counts, in a file that loads under weights_only
    assert len(arrays) == 2 and all(a.dtype == np.int64 for a in arrays)
    torch.save({"extra_state": {"metrics": {"valid": state}}}, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    assert [m[1] for m in loaded["extra_state"]["metrics"]["valid"]] == [m[1] for m in state]


def test_summed_bleu_counts_are_int64_arrays(task):
    criterion_keys = dict(loss=1.0, nll_loss=1.0, ntokens=4, nsentences=1, sample_size=4)
    bleu = evaluation.bleu_stats(["el gato"], ["el gato se sienta"])
    logs = [{**criterion_keys, **evaluation.empty_scores(), **bleu}]
    with metrics.aggregate(new_root=True) as agg:
        task.reduce_metrics([summed_like_all_reduce(logs)], LabelSmoothedCrossEntropyCriterion(task, False, 0.1))
        counts, totals = agg["_bleu_counts"].sum, agg["_bleu_totals"].sum
    assert counts.dtype == np.int64 and totals.dtype == np.int64
    assert counts.tolist() == [2, 1, 0, 0] and totals.tolist() == [2, 1, 0, 0]


def test_a_checkpoint_with_float64_metrics_loads_under_weights_only(tmp_path):
    """Checkpoints of several processes written before the counts were int64 hold float64 arrays: they load."""
    assert checkpoint_safety.FAIRSEQ_CHECKPOINT_GLOBALS  # the allow-list is registered on import
    path = tmp_path / "old.pt"
    torch.save({"extra_state": {"metrics": {"valid": [(10, "_bleu_counts", "SumMeter",
                                                       {"sum": np.array([3.0, 1.0, 0.0, 0.0])})]}}}, path)
    state = torch.load(path, weights_only=True)
    value = state["extra_state"]["metrics"]["valid"][0][3]["sum"]
    assert value.dtype == np.float64 and value.tolist() == [3.0, 1.0, 0.0, 0.0]


def test_a_stand_in_training_batch_logs_the_keys_of_a_real_one(task):
    """fairseq's stand-in batch (``ignore_grad``: a shard padded to the number of processes, or a batch emptied by
    --skip-bad-samples) must log ``n_skipped`` like every real batch, as 0."""
    model = build(task, "s2t_encdec_smoe_xs")
    criterion = LabelSmoothedCrossEntropyAsrCtcCriterion(task, False, 0.1, ctc_weight=0.3)
    optimizer = optim.build_optimizer(Namespace(optimizer="sgd", lr=[0.1], momentum=0.0, weight_decay=0.0),
                                      list(model.parameters()))
    sample = rows_of(task, "asr")
    sample["n_skipped"] = 2  # e.g. two unreadable files under --skip-bad-samples
    _, _, real = task.train_step(sample, model, criterion, optimizer, 0)
    model.zero_grad()
    _, _, stand_in = task.train_step(sample, model, criterion, optimizer, 0, ignore_grad=True)
    assert layout(real) == layout(stand_in)
    assert real["n_skipped"] == 2 and stand_in["n_skipped"] == 0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # and it taught nothing
