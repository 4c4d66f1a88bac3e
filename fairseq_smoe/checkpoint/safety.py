"""Allow-list the non-tensor objects that fairseq checkpoints hold, so they load under ``weights_only``.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: its unpickler only rebuilds tensors, containers
and the globals registered with ``torch.serialization.add_safe_globals``. fairseq's ``load_checkpoint_to_cpu``
(used by ``fairseq-generate``, ``load_model_ensemble`` and ``--restore-file`` / ``checkpoint_last.pt`` resume)
calls ``torch.load`` without ``weights_only``, so a checkpoint written by ``fairseq-train`` is refused because of:

* ``argparse.Namespace``: ``cfg["model"]`` for a legacy ``--arch``, any other ``cfg`` group whose component has
  no dataclass (e.g. ``cfg["task"]`` of ``speech_to_text``), and the legacy ``args``;
* numpy arrays (``_reconstruct``, ``ndarray``, ``dtype`` and the ``Int64DType`` / ``Float64DType`` that rebuild
  an int64 / float64 dtype) in ``extra_state["metrics"]``: the validation BLEU n-gram counts/totals, logged as
  ``np.array`` by our task and by fairseq's ``translation --eval-bleu``. Our task logs int64 counts; checkpoints of
  several processes written before that fix hold float64 ones (the all-reduce returns floats), and so can
  fairseq's own tasks. A dtype class only names a number format (it is data, not code), so allowing it runs nothing.

Everything else fairseq saves (``OrderedDict`` state dicts, ints/floats/strings, ``cfg`` converted to plain dicts)
is already allowed by torch. We register exactly these globals instead of passing ``weights_only=False``, so a
checkpoint holding any other global is refused (:class:`UnsafeCheckpointError`, naming the file and the global) and
nothing in it runs. A trusted legacy file (e.g. one whose ``cfg`` is a pickled omegaconf ``DictConfig``) is opted in
explicitly, once, by converting it::

    python -m fairseq_smoe.cli.trust_checkpoint --trust OLD.pt --out NEW.pt
 ``_reconstruct`` is registered under both its numpy < 2 (``numpy.core``) and numpy >= 2 (``numpy._core``)
names, because the pickle records the name of the numpy that saved it, not the one that loads it.
"""

import argparse
import functools
import os
import pickle

import numpy as np
import torch

from fairseq import checkpoint_utils

from . import signature

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
    type(np.dtype(np.float64)),  # numpy.dtypes.Float64DType: float64 BLEU sums of older multi-process checkpoints
)


def register() -> None:
    """Add the allow-list to torch's safe globals (a set union, so calling it again changes nothing)."""
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 has no weights_only allow-list and loads everything anyway
        add_safe_globals(list(FAIRSEQ_CHECKPOINT_GLOBALS))


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holding pickled objects outside the allow-list (an ``UnpicklingError``, as torch raises)."""


def refusal_message(path: str, detail: str) -> str:
    reason = next((line.strip() for line in detail.splitlines() if "GLOBAL" in line or "Unsupported" in line),
                  detail.strip().splitlines()[0] if detail.strip() else "unknown reason")
    return (
        f"{path}: refused to load: it holds pickled objects beyond what fairseq checkpoints contain, and "
        f"unpickling them could run code ({reason}). If you made this file or trust where it came from, convert it "
        f"once with `python -m fairseq_smoe.cli.trust_checkpoint --trust {path} --out CONVERTED.pt` and use the "
        f"converted file."
    )


def _guarded(load):
    @functools.wraps(load)
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        # fairseq loads the weights into the model after this returns: the signature check names this file then
        signature.note_checkpoint_path(str(path))
        try:
            return load(path, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(refusal_message(str(path), str(e))) from None

    load_checkpoint_to_cpu.smoe_guarded = True
    return load_checkpoint_to_cpu


def guard_fairseq_loader() -> None:
    """Route fairseq's ``load_checkpoint_to_cpu`` (resume, generate, ensembles) through :func:`_guarded`."""
    if not getattr(checkpoint_utils.load_checkpoint_to_cpu, "smoe_guarded", False):
        checkpoint_utils.load_checkpoint_to_cpu = _guarded(checkpoint_utils.load_checkpoint_to_cpu)


def _guarded_broadcast(broadcast_object_slow):
    """fairseq's ``_broadcast_object_slow`` with a payload that the receiving ranks' ``torch.load`` accepts.

    A multi-process resume loads the checkpoint on rank 0 only, and fairseq then sends that state to the other ranks
    as a ``torch.save``d buffer which they ``torch.load`` with torch's default ``weights_only=True``. By then rank 0's
    ``load_checkpoint_to_cpu`` has made ``state["cfg"]`` an omegaconf ``DictConfig``, and fairseq's tensor
    placeholders (``_TensorPlaceholder``) stand in for the tensors: both refused, so every multi-process resume
    failed on rank 1. The sender now sends plain containers (the trainer reads no ``cfg`` from the broadcast state;
    rank 0 keeps its own object) and the receivers allow the placeholder class for this one load: an int holder,
    no code. Everything else stays under the allow-list.
    """
    from fairseq.distributed import utils as distributed_utils

    placeholder = getattr(distributed_utils, "_TensorPlaceholder", None)

    @functools.wraps(broadcast_object_slow)
    def _broadcast_object_slow(obj, src_rank, group, dist_device):
        if distributed_utils.get_rank(group) == src_rank:
            broadcast_object_slow(plain_containers(obj), src_rank, group, dist_device)
            return obj
        allowed = [placeholder] if placeholder is not None else []
        with torch.serialization.safe_globals(allowed):
            return broadcast_object_slow(obj, src_rank, group, dist_device)

    _broadcast_object_slow.smoe_guarded = True
    return _broadcast_object_slow


def guard_fairseq_broadcast() -> None:
    """Route fairseq's checkpoint broadcast to the other ranks (resume with several processes) through
    :func:`_guarded_broadcast`."""
    from fairseq.distributed import utils as distributed_utils

    slow = getattr(distributed_utils, "_broadcast_object_slow", None)
    if slow is not None and hasattr(torch.serialization, "safe_globals") and not getattr(slow, "smoe_guarded", False):
        distributed_utils._broadcast_object_slow = _guarded_broadcast(slow)


def plain_containers(obj):
    """Containers of plain values from a legacy checkpoint's objects (omegaconf configs become dicts)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:
        pass
    if isinstance(obj, dict):  # dict or OrderedDict (state dicts), both allowed
        return type(obj)((k, plain_containers(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [plain_containers(v) for v in obj]
    if type(obj) is tuple:  # not its subclasses: a torch.Size (tensor metadata) must stay one
        return tuple(plain_containers(v) for v in obj)
    return obj


def convert_trusted(src: str, dst: str) -> None:
    """Load a checkpoint the user vouches for with full unpickling, and write it back in the allow-listed form."""
    state = torch.load(src, map_location="cpu", weights_only=False)  # explicit opt-in: the user said --trust
    state = plain_containers(state)
    tmp = f"{dst}.tmp"
    torch.save(state, tmp)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
    unsafe = [g for g in unsafe if g not in {_name(e) for e in FAIRSEQ_CHECKPOINT_GLOBALS}]
    if unsafe:
        os.unlink(tmp)
        raise UnsafeCheckpointError(
            f"{src}: still holds objects outside the allow-list after conversion: {unsafe}; convert them to plain "
            f"containers by hand"
        )
    os.replace(tmp, dst)


def _name(entry) -> str:
    return entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"


def install() -> None:
    """The allow-list, the guarded loader and the guarded broadcast (idempotent)."""
    register()
    guard_fairseq_loader()
    guard_fairseq_broadcast()
