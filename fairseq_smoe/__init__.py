"""fairseq_smoe: Supervised Mixture of Experts (S-MoE) speech-to-text as a fairseq ``--user-dir`` plugin.

The data path, as folders: ``data/`` (manifest -> dataset -> collater with route ids) -> ``routing.py`` (the route
contract: which expert a row uses, its guiding prefix) -> ``tasks/`` (guiding prefix, validation) -> ``modules/`` and
``models/`` (routed experts) -> ``decoding/`` (joint CTC/attention search) -> ``scoring/`` (WER, BLEU). Around it:
``criterions/``, ``checkpoint/`` (safe loading, signatures, atomic copies), ``cli/`` (commands), ``prep/`` (corpora),
``study/`` (system comparisons).

Importing the package registers the ``speech_to_text_smoe`` task, the ``s2t_smoe`` / ``s2t_lmoe`` models and their
architectures and the criteria (fairseq's registries), and calls :func:`checkpoint.install` once: the allow-list
that lets fairseq checkpoints load under torch's ``weights_only`` unpickler (refusing anything else with a clear
error), and atomic checkpoint copies so that a killed run always resumes.
"""

from . import checkpoint
from . import criterions  # noqa: F401  (registers the criteria)
from . import models  # noqa: F401  (registers the models and architectures)
from . import tasks  # noqa: F401  (registers speech_to_text_smoe)

checkpoint.install()

__version__ = "0.1.0"
