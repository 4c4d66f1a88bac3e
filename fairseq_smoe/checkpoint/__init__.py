"""Checkpoint plumbing: the weights_only allow-list (safety), route/dictionary signatures, atomic copies; :func:`install`."""

from . import atomic, safety


def install() -> None:
    """Patch fairseq once, explicitly: the guarded loader + allow-list + broadcast fix, and atomic checkpoint copies.

    Called by the package's ``__init__`` (so ``--user-dir fairseq_smoe`` gets it); calling it again changes nothing.
    """
    safety.install()
    atomic.install()
