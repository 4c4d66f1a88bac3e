"""Criteria: label smoothing with the learned gate's balance loss, and with auxiliary CTC on ASR rows."""

from . import label_smoothed_cross_entropy_moe  # noqa: F401
from . import label_smoothed_cross_entropy_asr_ctc  # noqa: F401
