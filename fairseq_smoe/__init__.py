"""fairseq_smoe: Supervised Mixture of Experts (S-MoE) speech-to-text as a fairseq ``--user-dir`` plugin.

Importing the package registers the ``speech_to_text_smoe`` task, the ``s2t_smoe`` model and its architectures,
the allow-list that lets fairseq checkpoints load under torch's ``weights_only`` unpickler (refusing anything
else with a clear error), and atomic checkpoint copies so that a killed run always resumes.
"""

from . import atomic_checkpoints  # noqa: F401  (checkpoint copies written atomically)
from . import checkpoint_safety  # noqa: F401  (registers the checkpoint allow-list)
from . import models  # noqa: F401
from . import criterions  # noqa: F401  (label_smoothed_cross_entropy_moe)
from . import task  # noqa: F401

__version__ = "0.1.0"
