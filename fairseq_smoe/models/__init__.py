from . import s2t_smoe  # noqa: F401
from . import s2t_lmoe  # noqa: F401
