"""Label-smoothed cross-entropy + auxiliary CTC on ASR rows + the switch load-balancing loss, for learned-gate models.

``loss = label_smoothed_ce + ctc_weight * ctc + moe_loss_coef * sample_size * aux``: the CTC term of
``label_smoothed_cross_entropy_asr_ctc`` and the balancing term of ``label_smoothed_cross_entropy_moe``, each
computed by the same function those criteria call (:mod:`.aux_losses`). Why: a learned-gate system
(``s2t_*_lmoe*``) in a study whose other systems are trained (and upcycled from a dense Base trained) with CTC
must get the same CTC term, and decode with the same joint CTC/attention search, or the comparison measures the
loss, not the routing; and its gate must still be balanced, or the router collapses onto one expert. Logs
``ctc_loss``, ``moe_aux`` and ``moe_dropped`` as the two criteria do. The model builds its CTC projection from
``--ctc-weight`` (> 0) and returns its encoder output for it (:class:`fairseq_smoe.models.s2t_lmoe.S2TLMoEModel`).
With a model without switch layers it is exactly ``label_smoothed_cross_entropy_asr_ctc``.
"""

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

from ..models.s2t_lmoe import MOE_ASR_CTC_CRITERION
from .aux_losses import (
    AsrCtc,
    add_switch_balancing_loss,
    asr_ctc_loss,
    check_ctc_weight,
    check_moe_loss_coef,
    log_ctc,
    reduce_ctc_metrics,
    reduce_moe_metrics,
)
from .label_smoothed_cross_entropy_asr_ctc import LabelSmoothedCrossEntropyAsrCtcCriterionConfig
from .label_smoothed_cross_entropy_moe import LabelSmoothedCrossEntropyMoECriterionConfig
from .logging_output import label_smoothed_logging_output


@dataclass
class LabelSmoothedCrossEntropyMoEAsrCtcCriterionConfig(LabelSmoothedCrossEntropyAsrCtcCriterionConfig,
                                                        LabelSmoothedCrossEntropyMoECriterionConfig):
    """``--ctc-weight`` and ``--moe-loss-coef`` with the defaults (and help) of the two criteria."""


@register_criterion(MOE_ASR_CTC_CRITERION, dataclass=LabelSmoothedCrossEntropyMoEAsrCtcCriterionConfig)
class LabelSmoothedCrossEntropyMoEAsrCtcCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0, report_accuracy=False,
                 ctc_weight=0.3, moe_loss_coef=0.01):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.ctc_weight = check_ctc_weight(ctc_weight)
        self.moe_loss_coef = check_moe_loss_coef(moe_loss_coef)
        self.ctc = AsrCtc(task, MOE_ASR_CTC_CRITERION)

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        ctc, n_ctc = asr_ctc_loss(self.ctc, model, net_output, sample)
        loss = loss + self.ctc_weight * ctc
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        loss, moe_logs = add_switch_balancing_loss(loss, net_output, sample_size, self.moe_loss_coef)
        _, logging_output = label_smoothed_logging_output(self, model, net_output, sample, loss, nll_loss)
        log_ctc(logging_output, ctc, n_ctc)
        logging_output.update(moe_logs)
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        reduce_ctc_metrics(logging_outputs)
        reduce_moe_metrics(logging_outputs)
