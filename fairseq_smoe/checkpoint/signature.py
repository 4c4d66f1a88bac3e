"""What a model was trained with (routing table, dictionary), stored in its state dict and checked on every load.

A checkpoint used with another ``config.yaml`` routing table or another dictionary would otherwise fail with a
tensor shape-mismatch trace (another dictionary size, another number of experts) or, worse, load and run with the
experts or the output tokens silently swapped (same sizes, other order). fairseq loads weights in several places
(``--restore-file`` / ``checkpoint_last.pt`` resume, ``fairseq-generate``, ``--finetune-from-model``), all through
``model.load_state_dict``; the hooks registered here run there, so every one of them refuses the mismatch with an
error naming the dictionary file, the routes and the checkpoint.

The signature is a ``uint8`` tensor holding JSON, under :data:`SIGNATURE_KEY`; checkpoints written before it existed
are still checked for the dictionary size.
"""

import hashlib
import json
from typing import Dict, Optional

import torch
from torch import nn

from fairseq.data import Dictionary

from ..routing import RoutingTable

SIGNATURE_KEY = "smoe_signature"
EMBED_KEY = "decoder.embed_tokens.weight"

# the checkpoint fairseq loaded last (told by the guarded loader through note_checkpoint_path), for error messages
_last_loaded: Dict[str, Optional[str]] = {"path": None}


class CheckpointMismatchError(ValueError):
    """A checkpoint trained with another routing table or dictionary than the data it is used with."""


class RoutingMismatchError(CheckpointMismatchError):
    """A model whose arguments (from its checkpoint) route its experts otherwise than this run's config.yaml."""


def _side_routes(routes) -> Optional[list]:
    """Route list of one side, from the signature's list or the model arguments' comma-separated form."""
    if routes is None or isinstance(routes, list):
        return routes
    return routes.split(",") if routes else None


def check_routes(have: Dict[str, Optional[list]], want: Dict[str, Optional[list]], describe, error=None) -> None:
    """The one route-mismatch check: per side, ``have`` (what the weights were trained with) must equal ``want``
    (this run's routes; None: no experts on that side, not checked). ``describe(side, have, want)`` words the
    error."""
    for side in ("encoder", "decoder"):
        key = f"{side}_routes"
        if have.get(key) != want.get(key):
            raise (error or CheckpointMismatchError)(describe(side, have.get(key), want.get(key)))


def check_model_args_routes(args, table: RoutingTable, config_yaml: str) -> None:
    """Refuse model arguments (e.g. a checkpoint's, at decoding time) whose experts are routed otherwise than
    ``table`` (this run's ``config.yaml``); sides without experts, or without routes in the arguments, pass."""
    own = table.to_args()
    have, want = {}, {}
    for side, uses_experts in (("encoder", "encoder_smoe"), ("decoder", "decoder_smoe")):
        key = f"{side}_routes"
        saved = getattr(args, key, None)
        if saved and getattr(args, uses_experts, False):
            have[key], want[key] = _side_routes(saved), _side_routes(own[key])

    def describe(side, h, w):
        return (f"the model's {side} experts are routed as [{','.join(h)}] but {config_yaml} (smoe.{side}_routes) "
                f"says [{','.join(w)}]: expert i would receive another route's data. Use the routing table the "
                f"model was trained with.")

    check_routes(have, want, describe, RoutingMismatchError)


def dictionary_md5(d: Dictionary) -> str:
    return hashlib.md5("\n".join(d.symbols).encode("utf-8")).hexdigest()


def make_signature(table: RoutingTable, tgt_dict: Dictionary, encoder_experts: bool, decoder_experts: bool) -> dict:
    return {
        "encoder_routes": list(table.encoder_routes) if encoder_experts else None,
        "decoder_routes": list(table.decoder_routes) if decoder_experts else None,
        "dictionary_size": len(tgt_dict),
        "dictionary_md5": dictionary_md5(tgt_dict),
    }


def encode(sig: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(sig, sort_keys=True).encode("utf-8")), dtype=torch.uint8)


def decode(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.tolist()).decode("utf-8"))


def note_checkpoint_path(path: str) -> None:
    """Remember the file fairseq is loading: its weights reach ``load_state_dict`` (and our check) later."""
    _last_loaded["path"] = path


def _checkpoint_name() -> str:
    return _last_loaded["path"] or "the checkpoint being loaded"


def compare(saved: Optional[dict], own: dict, dict_path: str, embed_rows: Optional[int]) -> None:
    """Raise :class:`CheckpointMismatchError` if a checkpoint's signature (or embedding size) differs from ``own``."""
    ckpt = _checkpoint_name()

    def describe(side, h, w):
        have = "no experts" if h is None else f"{side} experts routed as {h}"
        want = "no experts" if w is None else f"{side} experts routed as {w}"
        return (f"{ckpt} was trained with {have}, but this run's model has {want} (config.yaml smoe.{side}_routes "
                f"and --arch): expert i would receive another route's data. Use the routing table and architecture "
                f"the checkpoint was trained with.")

    if saved is not None:
        check_routes(saved, own, describe)
    size = saved["dictionary_size"] if saved is not None else embed_rows
    if size is not None and size != own["dictionary_size"]:
        raise CheckpointMismatchError(
            f"{ckpt} was trained with a dictionary of {size} entries, but {dict_path} has "
            f"{own['dictionary_size']}: use the dictionary and SentencePiece model the checkpoint was trained with"
        )
    if saved is not None and saved["dictionary_md5"] != own["dictionary_md5"]:
        raise CheckpointMismatchError(
            f"{ckpt} was trained with another dictionary of the same size ({size} entries, md5 "
            f"{saved['dictionary_md5']}) than {dict_path} (md5 {own['dictionary_md5']}): token ids would mean other "
            f"tokens. Use the dictionary the checkpoint was trained with."
        )


def attach(model: nn.Module, table: RoutingTable, tgt_dict: Dictionary, dict_path: str) -> None:
    """Save the signature with ``model.state_dict()`` and check it in ``model.load_state_dict()``."""
    encoder_experts = getattr(getattr(model, "encoder", None), "num_experts", 1) > 1
    decoder_experts = getattr(getattr(model, "decoder", None), "num_experts", 1) > 1
    own = make_signature(table, tgt_dict, encoder_experts, decoder_experts)
    model.smoe_signature = own

    def save_hook(module, state_dict, prefix, local_metadata):
        state_dict[prefix + SIGNATURE_KEY] = encode(own)
        return state_dict

    def load_pre_hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        raw = state_dict.pop(prefix + SIGNATURE_KEY, None)
        embed = state_dict.get(prefix + EMBED_KEY)
        compare(None if raw is None else decode(raw), own, dict_path, None if embed is None else embed.shape[0])

    model._register_state_dict_hook(save_hook)
    model._register_load_state_dict_pre_hook(load_pre_hook)
