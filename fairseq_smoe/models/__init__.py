from . import s2t_smoe  # noqa: F401
