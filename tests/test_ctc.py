"""The auxiliary CTC loss (label_smoothed_cross_entropy_asr_ctc): on ASR rows only, through fairseq-train, and gone
from what is decoded and exported."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairseq import checkpoint_utils

from fairseq_smoe.cli import params
from fairseq_smoe.criterions.label_smoothed_cross_entropy_asr_ctc import LabelSmoothedCrossEntropyAsrCtcCriterion
from fairseq_smoe.routing import RoutingTable
from test_dataset import ROWS, make_task, write_corpus

PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_smoe"
BIN = Path(sys.executable).parent


def build(task, arch="s2t_encdec_smoe_xs", ctc_weight=0.3):
    torch.manual_seed(0)
    args = params.model_args(arch, RoutingTable(), {"ctc_weight": ctc_weight})
    model = params.ARCH_MODEL_REGISTRY[arch].build_model(args, task)
    model.eval()  # no dropout: the same rows must give the same loss in any batch
    return model


@pytest.fixture()
def task_and_data(tmp_path):
    task = make_task(write_corpus(tmp_path, ROWS))
    task.load_dataset("train")
    return task, task.datasets["train"]


def batch_of(ds, indices):
    return ds.collater([ds[i] for i in indices])


def test_ctc_is_the_asr_rows_loss_and_ignores_st_rows(task_and_data):
    task, ds = task_and_data
    model = build(task)
    assert model.encoder.ctc_proj is not None
    crit = LabelSmoothedCrossEntropyAsrCtcCriterion(task, False, 0.1, ctc_weight=0.3)
    asr = [i for i in range(len(ds)) if ds.tasks[i] == "asr"]
    assert len(asr) == 3 and len(asr) < len(ds)

    mixed = batch_of(ds, range(len(ds)))
    with torch.no_grad():
        loss, _, log = crit(model, mixed)
        ctc_mixed = float(log["ctc_loss"])
        _, _, log_asr = crit(model, batch_of(ds, asr))
        ce_only = crit.compute_loss(model, model(**mixed["net_input"]), mixed)[0]
    assert log["ctc_rows"] == 3 and log_asr["ctc_rows"] == 3
    assert ctc_mixed > 0
    # the ST rows add nothing: the mixed batch's CTC equals the ASR rows' alone (the conv subsampler sees
    # the batch's padding, hence the tolerance; with the two ST rows counted it would be far larger)
    assert ctc_mixed == pytest.approx(float(log_asr["ctc_loss"]), rel=1e-2)  # up to padding effects
    # and the total is cross-entropy + weight * CTC
    assert float(loss) == pytest.approx(float(ce_only) + 0.3 * ctc_mixed, rel=1e-5)

    # a different ASR transcript changes the CTC loss; CTC is per row, so an ASR row's loss does not depend on
    # which other rows share the batch
    with torch.no_grad():
        single = [float(crit(model, batch_of(ds, [i]))[2]["ctc_loss"]) for i in asr]
    assert sum(single) == pytest.approx(ctc_mixed, rel=1e-2)
    assert len(set(round(s, 3) for s in single)) == 3


def test_a_batch_without_asr_rows_has_no_ctc_but_keeps_every_gradient(task_and_data):
    task, ds = task_and_data
    model = build(task)
    model.train()
    crit = LabelSmoothedCrossEntropyAsrCtcCriterion(task, False, 0.1, ctc_weight=0.3)
    st = [i for i in range(len(ds)) if ds.tasks[i] == "st"]
    loss, _, log = crit(model, batch_of(ds, st))
    assert log["ctc_rows"] == 0 and float(log["ctc_loss"]) == 0.0
    loss.backward()
    grad = model.encoder.ctc_proj.weight.grad
    assert grad is not None and float(grad.abs().sum()) == 0.0  # a zero gradient, not a missing one (DDP)
    conv = next(model.encoder.subsample.parameters())
    assert float(conv.grad.abs().sum()) > 0  # the cross-entropy still trains the encoder


def test_bad_settings_are_clear_errors(task_and_data):
    task, ds = task_and_data
    with pytest.raises(ValueError, match="--ctc-weight must be > 0"):
        LabelSmoothedCrossEntropyAsrCtcCriterion(task, False, 0.1, ctc_weight=0.0)
    crit = LabelSmoothedCrossEntropyAsrCtcCriterion(task, False, 0.1, ctc_weight=0.3)
    no_head = build(task, ctc_weight=0.0)
    with pytest.raises(RuntimeError, match="needs a model with a CTC projection"):
        crit(no_head, batch_of(ds, range(len(ds))))


def run(cmd, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{log[-6000:]}"
    return log


def test_fairseq_train_with_ctc_then_generate_and_export(corpus_dir, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    log = run([
        BIN / "fairseq-train", corpus_dir, "--user-dir", PLUGIN, "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--arch", "s2t_encdec_smoe_xs", "--train-subset", "train",
        "--valid-subset", "dev", "--criterion", "label_smoothed_cross_entropy_asr_ctc", "--ctc-weight", "0.3",
        "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", "5", "--max-sentences", "8", "--max-update", "30", "--seed", "1",
        "--save-dir", ckpt_dir, "--cpu", "--num-workers", "0", "--no-epoch-checkpoints", "--no-eval-scores",
        "--log-format", "simple", "--log-interval", "5",
    ], cwd=tmp_path)
    ctc = [float(x) for x in re.findall(r"train_inner \| .*?ctc_loss=([\d.]+)", log)]
    assert len(ctc) >= 4 and ctc[-1] < ctc[0], ctc  # the CTC loss is logged and falls
    ckpt = ckpt_dir / "checkpoint_last.pt"
    state = checkpoint_utils.load_checkpoint_to_cpu(str(ckpt))
    assert "encoder.ctc_proj.weight" in state["model"]

    # decoding builds the same model (strict load) and does not use the projection
    log = run([BIN / "fairseq-generate", corpus_dir, "--user-dir", PLUGIN, "--config-yaml", "config.yaml",
               "--task", "speech_to_text_smoe", "--gen-subset", "test_asr_wb", "--path", ckpt, "--max-tokens",
               "20000", "--beam", "2", "--max-len-b", "20", "--cpu", "--scoring", "wer"], cwd=tmp_path)
    assert re.search(r"WER: [\d.]+", log)

    dense = tmp_path / "dense.pt"
    run([sys.executable, "-m", "fairseq_smoe.cli.export", "--checkpoint", ckpt, "--encoder-route", "wb",
         "--decoder-route", "transcribe", "--out", dense], cwd=tmp_path)
    exported = checkpoint_utils.load_checkpoint_to_cpu(str(dense))
    assert not any(k.startswith("encoder.ctc_proj") for k in exported["model"])
