from . import label_smoothed_cross_entropy_moe  # noqa: F401
