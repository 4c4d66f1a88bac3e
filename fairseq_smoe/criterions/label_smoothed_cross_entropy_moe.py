"""Label-smoothed cross-entropy plus the switch load-balancing loss of learned-gate MoE models.

``loss = label_smoothed_ce + moe_loss_coef * sample_size * mean over switch layers of aux_loss``, the form of
fairseq's MoE branch (the aux loss is scaled by ``sample_size`` because fairseq divides the summed loss by it
before the gradient step). Logs ``moe_aux`` (mean per-layer aux loss: 1.0 is perfectly balanced, ``num_experts``
fully collapsed) and ``moe_dropped`` (fraction of tokens over capacity that skipped the FFN). With a model that has
no switch layers (S-MoE, dense) it is exactly ``label_smoothed_cross_entropy``.
"""

from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)

from ..models.s2t_lmoe import MOE_CRITERION
from .aux_losses import add_switch_balancing_loss, check_moe_loss_coef, reduce_moe_metrics
from .logging_output import label_smoothed_logging_output


@dataclass
class LabelSmoothedCrossEntropyMoECriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    moe_loss_coef: float = field(
        default=0.01,
        metadata={"help": "weight of the switch load-balancing loss (Switch Transformer: 0.01)"},
    )


@register_criterion(MOE_CRITERION, dataclass=LabelSmoothedCrossEntropyMoECriterionConfig)
class LabelSmoothedCrossEntropyMoECriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0, report_accuracy=False,
                 moe_loss_coef=0.01):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.moe_loss_coef = check_moe_loss_coef(moe_loss_coef)

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        loss, moe_logs = add_switch_balancing_loss(loss, net_output, sample_size, self.moe_loss_coef)
        _, logging_output = label_smoothed_logging_output(self, model, net_output, sample, loss, nll_loss)
        logging_output.update(moe_logs)
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        reduce_moe_metrics(logging_outputs)
