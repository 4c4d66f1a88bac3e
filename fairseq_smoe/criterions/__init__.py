"""Criteria: label smoothing with the learned gate's balance loss, with auxiliary CTC on ASR rows, and with both."""

from . import label_smoothed_cross_entropy_moe  # noqa: F401
from . import label_smoothed_cross_entropy_asr_ctc  # noqa: F401
from . import label_smoothed_cross_entropy_moe_asr_ctc  # noqa: F401
