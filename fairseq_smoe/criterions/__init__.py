from . import label_smoothed_cross_entropy_moe  # noqa: F401
from . import label_smoothed_cross_entropy_asr_ctc  # noqa: F401
