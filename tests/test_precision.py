"""Precision routes on the CPU: fp16 decoding, ``--amp --amp-dtype bfloat16`` training/validation/decoding under
torch.autocast, and ``--bf16`` (fairseq's TPU mode) refused at start-up with a message naming the route to use.

What the CPU cannot run: fairseq's ``--fp16`` *training* (its FP16Optimizer asks CUDA for a device); its validation
step is checked here in process, on a halved model and halved batch as fairseq's trainer makes them.
"""

import os
import re
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from train_commands import validated_train_cmd

from fairseq import optim, utils
from fairseq.optim.amp_optimizer import AMPOptimizer

from fairseq_smoe.data.config import ConfigError
from fairseq_smoe.criterions.label_smoothed_cross_entropy_asr_ctc import LabelSmoothedCrossEntropyAsrCtcCriterion
from fairseq_smoe.tasks.speech_to_text_smoe import SpeechToTextSMoETask
from test_ctc import batch_of, build
from test_dataset import ROWS, make_task, write_corpus

PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_smoe"
BIN = Path(sys.executable).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           PYTHONPATH=os.pathsep.join(filter(None, [str(PLUGIN.parent), os.environ.get("PYTHONPATH")])))
TIMEOUT = 600


@pytest.fixture()
def task_and_data(tmp_path):
    task = make_task(write_corpus(tmp_path, ROWS), "--eval-max-len-b", "5")
    task.load_dataset("train")
    return task, task.datasets["train"]


def all_rows(ds):
    return batch_of(ds, range(len(ds)))


def record_dtypes(model):
    """Forward hooks on the first convolution and the decoder's output projection: the dtypes they compute in."""
    seen = {"conv": [], "logits": []}
    conv = model.encoder.subsample.conv_layers[0]
    handles = [conv.register_forward_hook(lambda m, i, o: seen["conv"].append(o.dtype)),
               model.decoder.output_projection.register_forward_hook(lambda m, i, o: seen["logits"].append(o.dtype))]
    return seen, handles


@pytest.mark.parametrize("ctc_decode_weight", [0.0, 0.3])
def test_a_half_model_decodes_float_batches(task_and_data, ctc_decode_weight):
    """fairseq-generate --fp16 halves the model, not the batches: the task feeds the model its own dtype."""
    task, ds = task_and_data
    model = build(task).half()
    task.args.ctc_decode_weight = ctc_decode_weight
    sample = all_rows(ds)
    assert sample["net_input"]["src_tokens"].dtype == torch.float32
    seen, _ = record_dtypes(model)
    generator = task.build_generator([model], Namespace(beam=2, max_len_a=0, max_len_b=5, min_len=1))
    hypos = task.inference_step(generator, [model], sample)
    assert len(hypos) == len(ds) and all(len(n) == 2 for n in hypos)
    assert set(seen["conv"]) == {torch.float16} and set(seen["logits"]) == {torch.float16}
    assert sample["net_input"]["src_tokens"].dtype == torch.float32  # the caller's batch is left as it was


def test_validation_of_fp16_training_gets_half_batches_and_scores(task_and_data):
    """Under --fp16 fairseq's trainer halves model and batch itself; validation (loss and greedy WER/BLEU) runs."""
    task, ds = task_and_data
    model = build(task).half()
    criterion = LabelSmoothedCrossEntropyAsrCtcCriterion(task, False, 0.1, ctc_weight=0.3)
    sample = utils.apply_to_sample(lambda t: t.half() if t.dtype is torch.float32 else t, all_rows(ds))
    _, _, log = task.valid_step(sample, model, criterion)
    assert log["_wer_words"] > 0 and log["_bleu_ref_len"] > 0 and torch.isfinite(log["loss"])


def amp_task(task, dtype="bfloat16"):
    task.args.amp, task.args.amp_dtype = True, dtype
    return task


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_runs_training_validation_and_decoding_under_autocast(task_and_data, dtype, caplog):
    task, ds = task_and_data
    amp_task(task, dtype)
    expected = getattr(torch, dtype)
    model = build(task)
    model.train()
    criterion = LabelSmoothedCrossEntropyAsrCtcCriterion(task, False, 0.1, ctc_weight=0.3)
    sample = all_rows(ds)
    cfg = OmegaConf.create({"common": {"fp16_init_scale": 128, "amp_scale_window": None, "min_loss_scale": 1e-4},
                            "optimizer": {"_name": "sgd", "lr": [0.1], "momentum": 0.0, "weight_decay": 0.0}})
    amp_optimizer = AMPOptimizer.build_optimizer(cfg, list(model.parameters()))
    seen, _ = record_dtypes(model)
    with caplog.at_level("INFO", logger="fairseq_smoe.tasks.speech_to_text_smoe"):
        task.train_step(sample, model, criterion, amp_optimizer, 0)
        assert set(seen["conv"]) == {expected} and set(seen["logits"]) == {expected}
        # master weights and their gradients stay fp32
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
                   for p in model.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        seen["conv"].clear(), seen["logits"].clear()
        _, _, log = task.valid_step(sample, model, criterion)  # teacher-forced loss, then greedy decoding
        assert set(seen["conv"]) == {expected} and set(seen["logits"]) == {expected}
        assert log["_wer_words"] > 0 and log["_bleu_ref_len"] > 0
    assert f"--amp --amp-dtype {dtype}: training: decoder logits computed in {expected} on cpu" in caplog.text
    assert f"--amp --amp-dtype {dtype}: decoding: decoder logits computed in {expected} on cpu" in caplog.text
    # as in fairseq, a training step without the AMP optimizer does not autocast
    seen["conv"].clear()
    plain = optim.build_optimizer(Namespace(optimizer="sgd", lr=[0.1], momentum=0.0, weight_decay=0.0),
                                  list(model.parameters()))
    task.train_step(sample, model, criterion, plain, 1)
    assert set(seen["conv"]) == {torch.float32}


def test_precision_flags_are_checked_when_the_task_is_set_up(task_and_data, monkeypatch):
    """The checks of add_args' parser, again at setup_task: entry points that build the task from a config."""
    task, _ = task_and_data
    args = Namespace(**vars(task.args))
    args.bf16 = True
    with pytest.raises(ConfigError, match=r"--bf16: fairseq reserves --bf16 for TPUs .* use --amp --amp-dtype "
                                          r"bfloat16"):
        SpeechToTextSMoETask.setup_task(args)
    args = Namespace(**vars(task.args))
    args.amp, args.amp_dtype = False, "bfloat16"
    with pytest.raises(ConfigError, match=r"--amp-dtype bfloat16 takes effect with --amp only: add --amp"):
        SpeechToTextSMoETask.setup_task(args)
    # a GPU without bf16 hardware (before Ampere): named, with what to use there
    import fairseq_smoe.tasks.speech_to_text_smoe as task_module
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(task_module, "_cuda_has_native_bf16", lambda: False)
    args.amp, args.cpu = True, False
    with pytest.raises(ConfigError, match=r"--amp --amp-dtype bfloat16: Tesla V100-SXM2-32GB has no bf16 support; "
                                          r"use --amp \(float16\) or --fp16"):
        SpeechToTextSMoETask.setup_task(args)
    args.cpu = True  # --cpu: the CPU's autocast does bf16
    assert SpeechToTextSMoETask.setup_task(args).args.amp_dtype == "bfloat16"


# ------------------------------------------------------------------------------ through fairseq's command lines
def train_cmd(data, save_dir, *extra):
    return validated_train_cmd(data, save_dir, "--max-update", "3", "--no-epoch-checkpoints", *extra, seed=3)


def generate_cmd(data, checkpoint, *extra):
    return [
        str(BIN / "fairseq-generate"), str(data), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--gen-subset", "test_asr_wb", "--path", str(checkpoint),
        "--max-tokens", "20000", "--beam", "3", "--max-len-b", "10", "--cpu", *extra,
    ]


def run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    return proc.returncode, proc.stdout + proc.stderr


def test_bf16_training_and_decoding_on_the_cpu_through_fairseqs_clis(corpus_dir, tmp_path):
    rc, log = run(train_cmd(corpus_dir, tmp_path / "ckpt", "--amp", "--amp-dtype", "bfloat16"), tmp_path)
    assert rc == 0, log[-4000:]
    assert "--amp --amp-dtype bfloat16: training: decoder logits computed in torch.bfloat16 on cpu" in log
    assert "--amp --amp-dtype bfloat16: decoding: decoder logits computed in torch.bfloat16 on cpu" in log
    valid = re.findall(r"valid on 'dev' subset \|(.*)", log)
    assert valid and "num_updates 3" in valid[-1] and "| wer " in valid[-1] and "| bleu " in valid[-1]
    checkpoint = tmp_path / "ckpt" / "checkpoint_best.pt"
    n_rows = sum(1 for _ in open(Path(corpus_dir) / "test_asr_wb.tsv")) - 1
    for extra, dtype in ((["--amp", "--amp-dtype", "bfloat16"], "torch.bfloat16"),
                         (["--amp", "--amp-dtype", "bfloat16", "--ctc-decode-weight", "0.3"], "torch.bfloat16"),
                         (["--fp16"], None), (["--fp16", "--ctc-decode-weight", "0.3"], None)):
        rc, out = run(generate_cmd(corpus_dir, checkpoint, *extra), tmp_path)
        assert rc == 0, (extra, out[-3000:])
        assert len(re.findall(r"^D-\d+\t", out, re.M)) == n_rows, extra
        if dtype:
            assert f"decoding: decoder logits computed in {dtype} on cpu" in out, extra


@pytest.mark.parametrize("cli", ["fairseq-train", "fairseq-generate"])
def test_bf16_is_refused_at_start_up_naming_the_amp_route(corpus_dir, tmp_path, cli):
    if cli == "fairseq-train":
        cmd = train_cmd(corpus_dir, tmp_path / "ckpt", "--bf16")
    else:
        cmd = generate_cmd(corpus_dir, tmp_path / "none.pt", "--bf16")
    start = time.monotonic()
    rc, out = run(cmd, tmp_path)
    assert rc == 2, out[-3000:]
    assert time.monotonic() - start < 60  # at argument parsing: nothing loaded, no TPU device asked for
    assert f"{cli}: error: --bf16: fairseq reserves --bf16 for TPUs" in out
    assert "torch_xla is not installed" in out and "use --amp --amp-dtype bfloat16" in out
    assert not (tmp_path / "ckpt").exists()
