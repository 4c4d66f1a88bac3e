"""Allow-list the non-tensor objects that fairseq checkpoints hold, so they load under ``weights_only``.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: its unpickler only rebuilds tensors, containers
and the globals registered with ``torch.serialization.add_safe_globals``. fairseq's ``load_checkpoint_to_cpu``
(used by ``fairseq-generate``, ``load_model_ensemble`` and ``--restore-file`` / ``checkpoint_last.pt`` resume)
calls ``torch.load`` without ``weights_only``, so a checkpoint written by ``fairseq-train`` is refused because of:

* ``argparse.Namespace``: ``cfg["model"]`` for a legacy ``--arch``, any other ``cfg`` group whose component has
  no dataclass (e.g. ``cfg["task"]`` of ``speech_to_text``), and the legacy ``args``;
* numpy arrays (``_reconstruct``, ``ndarray``, ``dtype`` and the ``Int64DType`` that rebuilds an int64 dtype) in
  ``extra_state["metrics"]``: the validation BLEU n-gram counts/totals, logged as ``np.array`` by our task and by
  fairseq's ``translation --eval-bleu``.

Everything else fairseq saves (``OrderedDict`` state dicts, ints/floats/strings, ``cfg`` converted to plain dicts)
is already allowed by torch. We register exactly these globals instead of passing ``weights_only=False``, so a
checkpoint holding any other global still fails with torch's ``UnpicklingError`` naming that global and nothing in
it runs. ``_reconstruct`` is registered under both its numpy < 2 (``numpy.core``) and numpy >= 2 (``numpy._core``)
names, because the pickle records the name of the numpy that saved it, not the one that loads it.
"""

import argparse

import numpy as np
import torch

try:  # numpy >= 2 (1.26 also ships this alias)
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # numpy < 1.26
    from numpy.core import multiarray as _np_multiarray

FAIRSEQ_CHECKPOINT_GLOBALS = (
    argparse.Namespace,
    (_np_multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    (_np_multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.int64)),  # numpy.dtypes.Int64DType (numpy >= 1.25): the dtype instance that BUILD sets state on
)


def register() -> None:
    """Add the allow-list to torch's safe globals (a set union, so calling it again changes nothing)."""
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 has no weights_only allow-list and loads everything anyway
        add_safe_globals(list(FAIRSEQ_CHECKPOINT_GLOBALS))


register()
