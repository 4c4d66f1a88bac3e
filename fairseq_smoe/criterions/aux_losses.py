"""The two losses the plugin's criteria add to label-smoothed cross-entropy, each defined once.

* :func:`asr_ctc_loss`: the auxiliary CTC loss of the encoder on a batch's ASR rows (why and how: the docstring
  of :mod:`.label_smoothed_cross_entropy_asr_ctc`);
* :func:`switch_balancing_loss`: the switch load-balancing term of learned-gate models (why and how: the
  docstring of :mod:`.label_smoothed_cross_entropy_moe`).

``label_smoothed_cross_entropy_asr_ctc``, ``label_smoothed_cross_entropy_moe`` and their sum
``label_smoothed_cross_entropy_moe_asr_ctc`` all call these, so the combined criterion's loss is, by construction,
exactly the sum of the other two's terms, and a change to either rule reaches all three. The ``log_*`` /
``reduce_*`` pairs do the same for what is logged.
"""

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fairseq import utils
from fairseq.logging import metrics

from ..models.s2t_lmoe import AUX_KEY
from ..models.s2t_smoe import ENCODER_OUT_KEY
from ..routing import RoutingTable, asr_rows_of


# ------------------------------------------------------------------------------------------------------- CTC
def check_ctc_weight(ctc_weight: float) -> float:
    if not ctc_weight > 0:
        raise ValueError(f"--ctc-weight must be > 0 with this criterion, got {ctc_weight} "
                         f"(use label_smoothed_cross_entropy for none)")
    return ctc_weight


class AsrCtc:
    """What the CTC loss needs of the task: blank/pad/eos ids and the routing table telling ASR rows."""

    def __init__(self, task, criterion_name: str):
        d = task.target_dictionary
        self.blank_idx = d.bos()  # <s> (unused in targets) is the blank, as in fairseq's ``ctc`` criterion
        self.pad_idx = d.pad()
        self.eos_idx = d.eos()
        # which rows are ASR rows follows from their decoder routes (speech_to_text_smoe's table; default otherwise)
        self.routing_table = getattr(task, "routing_table", None) or RoutingTable()
        self.criterion_name = criterion_name


def asr_ctc_loss(ctc: AsrCtc, model, net_output, sample) -> Tuple[torch.Tensor, int]:
    """Summed CTC loss over the batch's ASR rows and how many rows that was."""
    extra = net_output[1] if isinstance(net_output[1], dict) else {}
    encoder_out = extra.get(ENCODER_OUT_KEY)
    ctc_proj = getattr(getattr(model, "encoder", None), "ctc_proj", None)
    if encoder_out is None or ctc_proj is None:
        raise RuntimeError(
            f"--criterion {ctc.criterion_name} needs a model with a CTC projection that returns its encoder output "
            f"(the s2t_smoe and s2t_lmoe architectures, built with --ctc-weight > 0: {type(model).__name__} "
            f"{'has no CTC projection' if ctc_proj is None else 'does not return it'})"
        )
    # the collater's per-row ASR mask (from the decoder route ids) is on the host: no device-to-host sync
    asr = np.flatnonzero(asr_rows_of(sample["net_input"], ctc.routing_table)).tolist()
    x = encoder_out["encoder_out"][0]  # T x B x C
    if not asr:
        # zero, but through the projection, so that every parameter still gets a (zero) gradient
        return sum(p.sum() for p in ctc_proj.parameters()).float() * 0.0, 0
    rows = torch.tensor(asr, dtype=torch.long, device=x.device)
    lprobs = utils.log_softmax(ctc_proj(x.index_select(1, rows)).float(), dim=-1)  # T x b x V
    lens = lprobs.new_full((rows.numel(),), lprobs.size(0), dtype=torch.long)
    if len(encoder_out.get("encoder_padding_mask", [])) > 0:
        lens = lens - encoder_out["encoder_padding_mask"][0].index_select(0, rows).long().sum(dim=-1)
    target = sample["target"].index_select(0, rows)
    # the guiding prefix (pad in ``target``: the collater masks it) and </s> are no CTC targets
    keep = (target != ctc.pad_idx) & (target != ctc.eos_idx)
    loss = F.ctc_loss(lprobs, target[keep], lens, keep.long().sum(dim=-1), blank=ctc.blank_idx,
                      reduction="sum", zero_infinity=True)
    return loss, rows.numel()


def log_ctc(logging_output: dict, ctc: torch.Tensor, rows: int) -> None:
    logging_output.update(ctc_loss=ctc.data, ctc_rows=rows)


def reduce_ctc_metrics(logging_outputs) -> None:
    rows = sum(log.get("ctc_rows", 0) for log in logging_outputs)
    if rows:
        total = sum(log.get("ctc_loss", 0) for log in logging_outputs)
        total = total.item() if torch.is_tensor(total) else total
        # per ASR utterance, in bits like fairseq's other losses
        metrics.log_scalar("ctc_loss", total / rows / math.log(2), rows, round=3)


# ------------------------------------------------------------------------------------------- switch balance
def check_moe_loss_coef(moe_loss_coef: float) -> float:
    if moe_loss_coef < 0:
        raise ValueError(f"--moe-loss-coef must be >= 0, got {moe_loss_coef}")
    return moe_loss_coef


def switch_balancing_loss(net_output) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Mean over switch layers of the aux loss and of the dropped-token fraction; None without switch layers."""
    records = net_output[1].get(AUX_KEY) if isinstance(net_output[1], dict) else None
    if not records:
        return None
    aux = torch.stack([r["aux_loss"] for r in records]).mean()
    dropped = torch.stack([r["dropped"] for r in records]).mean()
    return aux, dropped


def add_switch_balancing_loss(loss: torch.Tensor, net_output, sample_size, moe_loss_coef: float
                              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``loss + moe_loss_coef * sample_size * aux`` and the logs (``moe_aux``, ``moe_dropped``, times sample_size).

    ``sample_size`` because fairseq divides the summed loss by it before the gradient step (fairseq's MoE form).
    Without switch layers: ``loss`` unchanged, no logs.
    """
    stats = switch_balancing_loss(net_output)
    if stats is None:
        return loss, {}
    aux, dropped = stats
    loss = loss + moe_loss_coef * sample_size * aux.to(loss.dtype)
    return loss, {"moe_aux": aux.data * sample_size, "moe_dropped": dropped.data * sample_size}


def reduce_moe_metrics(logging_outputs) -> None:
    logs = [log for log in logging_outputs if "moe_aux" in log]
    if logs:
        sample_size = sum(log.get("sample_size", 0) for log in logs)
        for key in ("moe_aux", "moe_dropped"):
            value = sum(log[key] for log in logs)
            value = value.item() if torch.is_tensor(value) else value
            metrics.log_scalar(key, value / max(sample_size, 1), sample_size, round=3)
