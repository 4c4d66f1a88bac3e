"""Label-smoothed cross-entropy plus an auxiliary CTC loss on the encoder, for the ASR rows of a batch.

``loss = label_smoothed_ce + ctc_weight * ctc``: hybrid CTC/attention training (Watanabe et al. 2017; ESPnet's
default). A small attention model trained from scratch on little speech first learns to recite likely training
sentences and only later to listen; CTC ties every encoder frame to the transcript from the first update, so the
encoder learns acoustics at once. Only ASR rows get it (rows of ``smoe.asr_tasks``, told by the collater's per-row
mask): an ST row shares its audio (and its encoder input) with an ASR row, and the encoder does not know the task,
so CTC towards a translation would fight CTC towards the transcript. The guiding prefix and ``</s>`` are not CTC
targets; ``<s>`` (index 0, unused in targets) is the blank, as in fairseq's ``ctc`` criterion.

The CTC projection is fairseq's own ``S2TTransformerEncoder.ctc_proj``, built when ``--ctc-weight`` > 0. Plain
decoding, exported models and active-parameter counts leave it out; joint CTC/attention decoding
(``--ctc-decode-weight``, :mod:`fairseq_smoe.decoding.joint_ctc`) uses it.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.logging import metrics

from ..models.s2t_smoe import ENCODER_OUT_KEY
from ..routing import RoutingTable, asr_rows_of
from .logging_output import label_smoothed_logging_output


@dataclass
class LabelSmoothedCrossEntropyAsrCtcCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    ctc_weight: float = field(
        default=0.3,
        metadata={"help": "weight of the CTC loss on ASR rows (> 0; the model builds its CTC projection from it)"},
    )


@register_criterion("label_smoothed_cross_entropy_asr_ctc", dataclass=LabelSmoothedCrossEntropyAsrCtcCriterionConfig)
class LabelSmoothedCrossEntropyAsrCtcCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0, report_accuracy=False,
                 ctc_weight=0.3):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        if not ctc_weight > 0:
            raise ValueError(f"--ctc-weight must be > 0 with this criterion, got {ctc_weight} "
                             f"(use label_smoothed_cross_entropy for none)")
        self.ctc_weight = ctc_weight
        d = task.target_dictionary
        self.blank_idx = d.bos()
        self.pad_idx = d.pad()
        self.eos_idx = d.eos()
        # which rows are ASR rows follows from their decoder routes (speech_to_text_smoe's table; default otherwise)
        self.routing_table = getattr(task, "routing_table", None) or RoutingTable()

    def ctc_loss(self, model, net_output, sample):
        """Summed CTC loss over the batch's ASR rows and how many rows that was."""
        extra = net_output[1] if isinstance(net_output[1], dict) else {}
        encoder_out = extra.get(ENCODER_OUT_KEY)
        ctc_proj = getattr(getattr(model, "encoder", None), "ctc_proj", None)
        if encoder_out is None or ctc_proj is None:
            raise RuntimeError(
                f"--criterion label_smoothed_cross_entropy_asr_ctc needs a model with a CTC projection that returns "
                f"its encoder output (the s2t_smoe architectures: {type(model).__name__} does not)"
            )
        # the collater's per-row ASR mask (from the decoder route ids) is on the host: no device-to-host sync
        asr = np.flatnonzero(asr_rows_of(sample["net_input"], self.routing_table)).tolist()
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
        keep = (target != self.pad_idx) & (target != self.eos_idx)
        loss = F.ctc_loss(lprobs, target[keep], lens, keep.long().sum(dim=-1), blank=self.blank_idx,
                          reduction="sum", zero_infinity=True)
        return loss, rows.numel()

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        ctc, n_ctc = self.ctc_loss(model, net_output, sample)
        loss = loss + self.ctc_weight * ctc
        sample_size, logging_output = label_smoothed_logging_output(self, model, net_output, sample, loss, nll_loss)
        logging_output.update(ctc_loss=ctc.data, ctc_rows=n_ctc)
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        rows = sum(log.get("ctc_rows", 0) for log in logging_outputs)
        if rows:
            total = sum(log.get("ctc_loss", 0) for log in logging_outputs)
            total = total.item() if torch.is_tensor(total) else total
            # per ASR utterance, in bits like fairseq's other losses
            metrics.log_scalar("ctc_loss", total / rows / math.log(2), rows, round=3)
