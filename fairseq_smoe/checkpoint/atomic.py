"""Make every checkpoint file fairseq writes appear whole or not at all, so a killed run always resumes.

fairseq writes the first checkpoint of a save atomically (``torch_persistent_save``: ``.tmp`` then rename), but
then *copies* it to the others (``checkpoint_last.pt``, ``checkpoint_best.pt``) with ``PathManager.copy``, i.e.
``shutil.copyfile`` into the destination itself. A ``SIGKILL`` (pre-emption, OOM killer, ``scancel``) during that
copy leaves a truncated ``checkpoint_last.pt``, and rerunning the same command then crashes in ``torch.load``
instead of resuming. :func:`install` makes that copy write a temporary sibling and rename it over the destination,
which POSIX makes atomic; remote paths (``s3://`` …) keep fairseq's own copy.
"""

import os
import shutil

from fairseq.file_io import PathManager

_fairseq_copy = PathManager.copy


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    if "://" in str(dst_path):
        return _fairseq_copy(src_path, dst_path, overwrite)
    if not overwrite and os.path.exists(dst_path):
        return False
    tmp = f"{dst_path}.tmp"  # one fixed name (as torch_persistent_save's): a killed copy leaves no pile-up
    try:
        shutil.copyfile(src_path, tmp)
        os.replace(tmp, dst_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def install() -> None:
    if PathManager.copy is not atomic_copy:
        PathManager.copy = staticmethod(atomic_copy)

