"""Count total and active (per route) parameters of a registered architecture, without data or a checkpoint.

    python -m fairseq_smoe.cli.params --arch s2t_encdec_smoe --vocab-size 40000

prints JSON: ``total`` (every weight trained) and, for each (encoder route, decoder route) pair, ``active`` (the
weights one sample of that route pair runs through: shared weights plus one expert per S-MoE layer).
"""

import argparse
import json
import sys
from typing import Dict, Optional

import torch
from torch import nn

from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

from ..modules.expert_layer import ExpertLinear
from ..tasks.dictionary_only import DictionaryOnlyTask
from ..routing import DEFAULT_DECODER_ROUTES, DEFAULT_ENCODER_ROUTES, RoutingTable
from ..modules.switch_layer import SwitchLinear


def model_args(arch: str, table: RoutingTable, overrides: Optional[Dict] = None) -> argparse.Namespace:
    """The Namespace fairseq would build for ``--arch ARCH`` with no other model flag."""
    if arch not in ARCH_MODEL_REGISTRY:
        raise ValueError(f"unknown --arch {arch!r}")
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    ARCH_MODEL_REGISTRY[arch].add_args(parser)
    args = parser.parse_args([])
    args.arch = arch
    args.input_feat_per_channel = 80
    args.input_channels = 1
    args.max_source_positions = 6000
    args.max_target_positions = 1024
    for k, v in table.to_args().items():
        setattr(args, k, v)
    for k, v in (overrides or {}).items():
        setattr(args, k, v)
    ARCH_CONFIG_REGISTRY[arch](args)
    return args


def build(arch: str, vocab_size: int, table: Optional[RoutingTable] = None, overrides: Optional[Dict] = None):
    table = table or RoutingTable(DEFAULT_ENCODER_ROUTES, DEFAULT_DECODER_ROUTES)
    args = model_args(arch, table, overrides)
    with torch.device("meta"):  # shapes only: no memory, no init time
        return ARCH_MODEL_REGISTRY[arch].build_model(args, DictionaryOnlyTask(vocab_size))


def count(model: nn.Module, table: Optional[RoutingTable] = None) -> Dict:
    """Total parameters, and active parameters for every (encoder route, decoder route) pair.

    For a learned-gate (switch) model the expert is chosen per token, not per route pair: ``active`` then has one
    entry, ``top-1``, counting one expert per FFN plus the routers.
    """
    table = table or getattr(model, "routing_table", None) or RoutingTable()
    total = sum(p.numel() for p in model.parameters())
    per_expert = {"encoder": 0, "decoder": 0}
    expert_total = 0
    learned = False
    for name, module in model.named_modules():
        if isinstance(module, ExpertLinear):
            side = "encoder" if name.startswith("encoder.") else "decoder"
            weights = module.weight.numel() + module.bias.numel()  # a switch fc1's router is shared, not expert
            per_expert[side] += weights // module.num_experts
            expert_total += weights
            learned = learned or isinstance(module, SwitchLinear)
    shared = total - expert_total
    one_route = shared + per_expert["encoder"] + per_expert["decoder"]
    if learned:
        return {"total": total, "active": {"top-1": one_route}}
    active = {}
    enc_routes = table.encoder_routes if per_expert["encoder"] else ("*",)
    dec_routes = table.decoder_routes if per_expert["decoder"] else ("*",)
    for e in enc_routes:
        for d in dec_routes:
            active[f"{e}/{d}"] = one_route
    return {"total": total, "active": active}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", required=True)
    p.add_argument("--vocab-size", type=int, default=40000, help="entries in the target dictionary (with specials)")
    p.add_argument("--encoder-routes", default=",".join(DEFAULT_ENCODER_ROUTES))
    p.add_argument("--decoder-routes", default=",".join(DEFAULT_DECODER_ROUTES))
    a = p.parse_args(argv)
    from .. import models  # noqa: F401  registers the architectures

    table = RoutingTable(a.encoder_routes, a.decoder_routes)
    try:
        model = build(a.arch, a.vocab_size, table)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"arch": a.arch, "vocab_size": a.vocab_size, **count(model, table)}
    result["total_M"] = round(result["total"] / 1e6, 2)
    result["active_M"] = {k: round(v / 1e6, 2) for k, v in result["active"].items()}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
