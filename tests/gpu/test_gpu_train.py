"""fairseq-train in fp16 (``--fp16``), AMP (``--amp``) and bf16 (``--amp --amp-dtype bfloat16``) on CUDA: a few updates
of an _xs S-MoE model with the auxiliary CTC loss, validation with WER/BLEU and ``--best-checkpoint-metric wer``;
the loss stays finite and falls, and the checkpoints are written in the precision asked for."""

import math
import re

import pytest
import torch

from gpu_helpers import NO_BF16, TRAIN_PRECISIONS, TRAIN_UPDATES, native_bf16, record, train_losses


@pytest.mark.parametrize("precision", TRAIN_PRECISIONS)
def test_mixed_precision_training_validates_and_its_loss_falls(trainings, precision, device):
    if precision == "bf16" and not native_bf16(device):
        pytest.skip(NO_BF16)
    rc, log, save_dir, seconds = trainings[precision]
    assert rc == 0, log[-6000:]
    losses = train_losses(log)
    # fp16's dynamic loss scaler may skip an update that overflowed: it is logged and not counted
    skipped = len(re.findall(r"gradient overflow detected", log))
    assert len(losses) == TRAIN_UPDATES, (losses, log[-3000:])
    assert skipped <= TRAIN_UPDATES // 4, f"{skipped} of {TRAIN_UPDATES} updates overflowed in {precision}"
    assert all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, f"{precision}: loss did not fall: first updates {losses[:5]}, last {losses[-5:]}"
    # validation decoded the dev set (ASR and ST rows) and chose the best checkpoint by WER
    valid = re.search(r"valid on 'dev' subset \|.*? wer ([\d.]+) \|.*? bleu ([\d.]+)", log)
    assert valid, log[-3000:]
    assert f"num_updates {TRAIN_UPDATES}" in log[valid.start():valid.end() + 200]
    assert (save_dir / "checkpoint_best.pt").is_file(), log[-3000:]
    if precision in ("amp", "bf16"):  # autocast reached the model, on this device (the task logs it once)
        dtype = "bfloat16" if precision == "bf16" else "float16"
        assert f"--amp --amp-dtype {dtype}: training: decoder logits computed in torch.{dtype} on {device}" in log, \
            log[-3000:]
        assert f"--amp --amp-dtype {dtype}: decoding: decoder logits computed in torch.{dtype} on {device}" in log
    state = torch.load(save_dir / "checkpoint_best.pt", map_location="cpu", weights_only=False)
    cfg = state["cfg"]
    assert cfg["common"]["fp16"] is (precision == "fp16")
    assert cfg["common"]["amp"] is (precision in ("amp", "bf16"))
    if precision in ("amp", "bf16"):
        assert cfg["task"].amp_dtype == ("bfloat16" if precision == "bf16" else "float16")
    weights = {v.dtype for k, v in state["model"].items() if torch.is_tensor(v) and v.is_floating_point()}
    # fairseq writes fp32 checkpoints in every precision (utils.move_to_cpu casts half tensors): they load anywhere
    assert weights == {torch.float32}, weights
    assert all(torch.isfinite(v).all() for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point())
    record(f"train_{precision}", {"device": device, "updates": TRAIN_UPDATES, "seconds_with_validation":
                                  round(seconds, 1), "first_loss": losses[0], "last_loss": losses[-1],
                                  "overflow_skips": skipped, "valid_wer": float(valid.group(1))})
