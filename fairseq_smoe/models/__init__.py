"""Model registrations: ``s2t_smoe`` (supervised experts) and ``s2t_lmoe`` (learned gate), with architectures."""

from . import s2t_smoe  # noqa: F401
from . import s2t_lmoe  # noqa: F401
