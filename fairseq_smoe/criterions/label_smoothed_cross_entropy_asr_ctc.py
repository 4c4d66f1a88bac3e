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

from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)

from .aux_losses import AsrCtc, asr_ctc_loss, check_ctc_weight, log_ctc, reduce_ctc_metrics
from .logging_output import label_smoothed_logging_output

ASR_CTC_CRITERION = "label_smoothed_cross_entropy_asr_ctc"


@dataclass
class LabelSmoothedCrossEntropyAsrCtcCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    ctc_weight: float = field(
        default=0.3,
        metadata={"help": "weight of the CTC loss on ASR rows (> 0; the model builds its CTC projection from it)"},
    )


@register_criterion(ASR_CTC_CRITERION, dataclass=LabelSmoothedCrossEntropyAsrCtcCriterionConfig)
class LabelSmoothedCrossEntropyAsrCtcCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0, report_accuracy=False,
                 ctc_weight=0.3):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.ctc_weight = check_ctc_weight(ctc_weight)
        self.ctc = AsrCtc(task, ASR_CTC_CRITERION)

    def ctc_loss(self, model, net_output, sample):
        """Summed CTC loss over the batch's ASR rows and how many rows that was."""
        return asr_ctc_loss(self.ctc, model, net_output, sample)

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        ctc, n_ctc = self.ctc_loss(model, net_output, sample)
        loss = loss + self.ctc_weight * ctc
        sample_size, logging_output = label_smoothed_logging_output(self, model, net_output, sample, loss, nll_loss)
        log_ctc(logging_output, ctc, n_ctc)
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        reduce_ctc_metrics(logging_outputs)
