"""Average the weights of several checkpoints of one training run into one checkpoint (fairseq's recipe step).

    python -m fairseq_smoe.cli.average_checkpoints --inputs exp/s2t_dec_smoe --num-update-checkpoints 5 \\
        --output exp/s2t_dec_smoe/checkpoint_avg5.pt
    python -m fairseq_smoe.cli.average_checkpoints --inputs a.pt b.pt c.pt --output avg.pt

Every published fairseq S2T result decodes the average of the last 10 checkpoints, made by fairseq's
``scripts/average_checkpoints.py``. That script is not installed with fairseq's wheel and loads with a bare
``torch.load``, which torch >= 2.6 refuses for fairseq checkpoints. This command keeps its semantics and options
(``--inputs`` files, or one directory with ``--num-epoch-checkpoints`` / ``--num-update-checkpoints N``: the newest N
``checkpoint{E}.pt`` / ``checkpoint_{E}_{U}.pt`` by epoch / update number, ``--checkpoint-upper-bound``; the first
input's non-model state is kept, so with a directory that is the newest checkpoint's) and adds what the plugin needs:

* only safe checkpoints are loaded: through fairseq's ``checkpoint_utils.load_checkpoint_to_cpu``, which the plugin
  guards with its ``weights_only`` allow-list (:mod:`fairseq_smoe.checkpoint.safety`); anything else is refused,
  naming the file, and nothing in it runs;
* checkpoints of different architectures (``cfg.model``'s arch), routes or dictionaries (the ``smoe_signature`` the
  plugin stores in every state dict, :mod:`fairseq_smoe.checkpoint.signature`), parameter names or shapes are refused
  with an error naming both files: their average would be a model of neither;
* float tensors are summed in float64 and written back in their own dtype, so the average of N copies of one
  checkpoint is that checkpoint bit for bit (fairseq sums in the tensors' dtype, fp32 for fp16); non-float tensors
  (the uint8 signature, integer buffers) are copied from the first input and must be equal in all;
* the output is written atomically (``.tmp`` then rename, fairseq's ``torch_persistent_save``) in the same
  allow-listed form, so fairseq-generate and the plugin load it like any checkpoint.
"""

import argparse
import os
import re
import sys
from collections import OrderedDict
from typing import List, Optional

import torch

# importing this module imports the fairseq_smoe package first, whose __init__ installs the guarded loader
from fairseq import checkpoint_utils

from ..checkpoint import safety, signature

EPOCH_RE = re.compile(r"checkpoint(\d+)\.pt")
UPDATE_RE = re.compile(r"checkpoint_\d+_(\d+)\.pt")


class AverageError(ValueError):
    """Inputs that cannot be averaged (missing, unsafe, or of different models); the message names the files."""


def last_n_checkpoints(paths: List[str], n: int, update_based: bool, upper_bound: Optional[int] = None) -> List[str]:
    """The newest ``n`` epoch (``checkpoint{E}.pt``) or update (``checkpoint_{E}_{U}.pt``) checkpoints of one
    directory, newest first, with epoch / update number at most ``upper_bound`` (fairseq's selection)."""
    if len(paths) != 1 or not os.path.isdir(paths[0]):
        raise AverageError(f"--num-{'update' if update_based else 'epoch'}-checkpoints needs one directory as "
                           f"--inputs, got {paths}")
    path = paths[0]
    pattern = UPDATE_RE if update_based else EPOCH_RE
    entries = []
    for f in os.listdir(path):
        m = pattern.fullmatch(f)
        if m is not None and (upper_bound is None or int(m.group(1)) <= upper_bound):
            entries.append((int(m.group(1)), f))
    if len(entries) < n:
        kind = "checkpoint_<epoch>_<update>.pt" if update_based else "checkpoint<epoch>.pt"
        bound = f" with number <= {upper_bound}" if upper_bound is not None else ""
        raise AverageError(f"{path}: found {len(entries)} {kind} files{bound}, need at least {n} (fairseq-train keeps "
                           f"them with --keep-interval-updates / --keep-last-epochs)")
    return [os.path.join(path, f) for _, f in sorted(entries, reverse=True)[:n]]


def load(path: str) -> dict:
    """One checkpoint through fairseq's (guarded) loader: only the allow-listed pickle globals are rebuilt."""
    if not os.path.isfile(path):
        raise AverageError(f"{path}: no such checkpoint file")
    try:
        return checkpoint_utils.load_checkpoint_to_cpu(path)
    except safety.UnsafeCheckpointError as e:
        raise AverageError(str(e)) from None
    except Exception as e:  # truncated / not a torch file
        raise AverageError(f"{path}: cannot be read as a fairseq checkpoint ({type(e).__name__}: {e})") from None


def arch_of(state: dict) -> Optional[str]:
    """The architecture a checkpoint was trained with: ``cfg.model`` (a Namespace for ``--arch``, or a dataclass
    config with ``_name``), else the legacy ``args``."""
    cfg = state.get("cfg")
    model = cfg.get("model") if cfg is not None else None
    for obj in (model, state.get("args")):
        if obj is None:
            continue
        for key in ("arch", "_name"):
            value = obj.get(key) if hasattr(obj, "get") else getattr(obj, key, None)
            if value:
                return str(value)
    return None


def signature_of(state: dict) -> Optional[dict]:
    raw = state["model"].get(signature.SIGNATURE_KEY)
    return None if raw is None else signature.decode(raw)


def check_same_model(first: str, first_state: dict, path: str, state: dict) -> None:
    """Refuse ``path`` unless it is a checkpoint of the same model as ``first``: arch, routes, dictionary, and the
    parameter names and shapes."""
    a, b = arch_of(first_state), arch_of(state)
    if a != b:
        raise AverageError(f"{first} and {path} have different architectures ({a} vs {b}): only checkpoints of one "
                           f"model can be averaged")
    sa, sb = signature_of(first_state), signature_of(state)
    if (sa is None) != (sb is None):
        which = first if sa is None else path
        raise AverageError(f"{first} and {path} cannot be averaged: {which} has no route/dictionary signature "
                           f"({signature.SIGNATURE_KEY}), the other has one")
    if sa is not None:
        for side in ("encoder", "decoder"):
            key = f"{side}_routes"
            if sa.get(key) != sb.get(key):
                raise AverageError(f"{first} and {path} have different {side} routes ({sa.get(key)} vs "
                                   f"{sb.get(key)}): expert i would average two routes' weights")
        if (sa["dictionary_size"], sa["dictionary_md5"]) != (sb["dictionary_size"], sb["dictionary_md5"]):
            raise AverageError(f"{first} and {path} have different dictionaries ({sa['dictionary_size']} entries, md5 "
                               f"{sa['dictionary_md5']} vs {sb['dictionary_size']} entries, md5 "
                               f"{sb['dictionary_md5']}): token ids would mean other tokens")
    ka, kb = list(first_state["model"]), list(state["model"])
    if ka != kb:
        extra = sorted(set(kb) - set(ka))[:5]
        missing = sorted(set(ka) - set(kb))[:5]
        raise AverageError(f"{first} and {path} have different parameters (only in {path}: {extra}; missing there: "
                           f"{missing})")
    for k in ka:
        ta, tb = first_state["model"][k], state["model"][k]
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            raise AverageError(f"{first} and {path} differ in {k}: {tuple(ta.shape)} {ta.dtype} vs "
                               f"{tuple(tb.shape)} {tb.dtype}")


def average_checkpoints(inputs: List[str]) -> dict:
    """The state of ``inputs[0]`` with its model weights replaced by the mean over all ``inputs``."""
    if not inputs:
        raise AverageError("no checkpoints to average")
    first_state = None
    sums = OrderedDict()
    for path in inputs:
        state = load(path)
        if first_state is None:
            first_state = state
            for k, t in state["model"].items():
                sums[k] = t.to(torch.float64).clone() if t.is_floating_point() else t.clone()
            continue
        check_same_model(inputs[0], first_state, path, state)
        for k, t in state["model"].items():
            if t.is_floating_point():
                sums[k] += t.to(torch.float64)
            elif not torch.equal(t, sums[k]):
                raise AverageError(f"{inputs[0]} and {path} differ in the non-float tensor {k} (copied, not "
                                   f"averaged): they are not checkpoints of one model")
        del state
    n = len(inputs)
    averaged = OrderedDict()
    for k, t in first_state["model"].items():
        averaged[k] = (sums[k] / n).to(t.dtype) if t.is_floating_point() else sums[k]
    # back to the plain containers fairseq-train writes (the loader made cfg an omegaconf DictConfig), so the
    # output loads under the same weights_only allow-list
    new_state = safety.plain_containers(first_state)
    new_state["model"] = averaged
    return new_state


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Average the parameters of checkpoints of one model into a new "
                                            "checkpoint (fairseq's scripts/average_checkpoints.py, loading only safe "
                                            "checkpoints and refusing different models).")
    p.add_argument("--inputs", required=True, nargs="+",
                   help="checkpoint files, or one directory with --num-epoch-checkpoints / --num-update-checkpoints")
    p.add_argument("--output", required=True, metavar="FILE", help="where to write the averaged checkpoint")
    num = p.add_mutually_exclusive_group()
    num.add_argument("--num-epoch-checkpoints", type=int, metavar="N",
                     help="average the newest N checkpoint<epoch>.pt of the --inputs directory")
    num.add_argument("--num-update-checkpoints", type=int, metavar="N",
                     help="average the newest N checkpoint_<epoch>_<update>.pt of the --inputs directory")
    p.add_argument("--checkpoint-upper-bound", type=int, metavar="K",
                   help="with --num-epoch/update-checkpoints: only epochs / updates <= K (e.g. N=10, K=50: epochs "
                        "41-50)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    num = args.num_update_checkpoints if args.num_update_checkpoints is not None else args.num_epoch_checkpoints
    if args.checkpoint_upper_bound is not None and num is None:
        print("error: --checkpoint-upper-bound needs --num-epoch-checkpoints or --num-update-checkpoints",
              file=sys.stderr)
        return 2
    if num is not None and num < 1:
        print(f"error: --num-{'update' if args.num_update_checkpoints is not None else 'epoch'}-checkpoints {num}: "
              f"must be at least 1", file=sys.stderr)
        return 2
    try:
        inputs = args.inputs
        if num is not None:
            inputs = last_n_checkpoints(inputs, num, args.num_update_checkpoints is not None,
                                        args.checkpoint_upper_bound)
        elif any(os.path.isdir(x) for x in inputs):
            raise AverageError(f"--inputs {' '.join(inputs)}: a directory needs --num-epoch-checkpoints or "
                               f"--num-update-checkpoints")
        print(f"averaging {len(inputs)} checkpoints: {' '.join(inputs)}", flush=True)
        state = average_checkpoints(inputs)
    except AverageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    checkpoint_utils.torch_persistent_save(state, args.output)  # .tmp, then rename: whole or not at all
    print(f"wrote {args.output}: the average of {len(inputs)} checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
