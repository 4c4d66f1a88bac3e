"""Upcycle a dense checkpoint into any S-MoE or learned-gate system of the same size, equal to it at step 0.

    python -m fairseq_smoe.cli.upcycle --dense exp/base/checkpoint_best.pt --arch s2t_dec_smoe_xs \\
        --out exp/dec_smoe/upcycled.pt [--data DATA --config-yaml config.yaml]

then continue it with ``fairseq-train DATA ... --arch s2t_dec_smoe_xs --finetune-from-model exp/dec_smoe/upcycled.pt``
(the command prints the exact flags). Why: a study that compares systems trained from the same dense trunk sees
the effect of the experts, not the noise of separate random starts, and a user can grow a trained model into
experts without training from scratch.

What the output holds (every target starts as the dense model's function, for every route):

* everything but the FFNs and the gates: copied;
* S-MoE experts (``s2t_*_smoe*``, encoder and/or decoder): every expert a copy of the dense FFN of its layer;
* learned-gate experts (``s2t_*_lmoe*``): every expert a copy of the dense FFN, its ``fc2`` weight and bias times
  the number of experts E; the gate (``fc1.gate``) starts at zeros (``--gate-std 0``). switch_layer.py scales an
  expert's output by its router probability, which a zero gate makes exactly 1/E for every token, so the copies
  times E give back the dense FFN (exactly for E = 2, a power of two). All probabilities tie, so every token takes
  the same expert (the first); at evaluation each expert has room for ``ceil(eval_capacity_factor * tokens / E)``
  tokens, so the tool raises ``moe_eval_capacity_factor`` to E where it is smaller (default 2.0 = E for two
  routes) and no token is dropped. In training (``--moe-capacity-factor``, default 1.25) the same tie overflows
  the first expert: at step 0 a fraction ``1 - ceil(1.25 n / E) / n`` of the n tokens (37.5 % for E = 2) skips
  the FFN, until the gate, which gets gradients through the router probability and the balancing loss, spreads
  them. ``--gate-std S`` draws the gate from N(0, S^2) instead: tokens spread from step 0, the output then
  matches the dense model only to about S times the hidden size;
* DecFFNx2 (``s2t_dec_ffnx2*``): the decoder FFN widened function-preservingly: the k-times wider ``fc1`` holds k
  copies of the dense hidden units, ``fc2`` their k copies of the output weights divided by k (k = 2, exact
  halving), the same ``fc2`` bias.

Sources: a checkpoint of this plugin's dense Base (``s2t_smoe_base*``) or a stock fairseq ``s2t_transformer``
checkpoint (the form of fairseq's published S2T models). A stock dictionary lacks the guiding tokens: the tool
appends the missing ones (:meth:`fairseq_smoe.routing.RoutingTable.guiding_symbols`: one per task and decoder
route, then one ``<lang:xx>`` per ``--langs`` language or per language tag already in the data's or the dense dictionary) after
the existing entries, so every old token keeps its id; their embedding rows start at the mean of the dense
embedding rows, their output-projection (and CTC projection) rows at zeros. The new dictionary is written next
to the output (``OUT`` with suffix ``.dict.txt``) and logged; the data directory's ``config.yaml`` must name it
as ``vocab_filename`` (the checkpoint's signature holds its md5, so a run with another dictionary is refused).
On the stock model's own token sequences the upcycled model gives the same logits over the stock vocabulary and
0 for the new tokens.

Sizes: the target gets the dense model's dimensions. ``--arch`` must be of the same size: each dimension of its
defaults must equal the dense architecture's default (so the dense run's own overrides, e.g. tiny test sizes,
carry over) or the dense model's actual value (e.g. stock ``s2t_transformer_m`` -> the paper-size systems).
``--keep-source-size`` builds ``--arch``'s variant at the dense model's dimensions anyway.

The output's state dict carries the plugin's route/dictionary signature (:mod:`fairseq_smoe.checkpoint.signature`)
for the target: routes from ``--data``'s ``config.yaml`` (else the dense checkpoint's, else the defaults).
Sources are loaded through fairseq's ``checkpoint_utils`` only (the plugin's ``weights_only`` allow-list).
"""

import argparse
import copy
import logging
import re
import sys
from argparse import Namespace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from fairseq import checkpoint_utils
from fairseq.data import Dictionary
from fairseq.data.audio.data_cfg import S2TDataConfig
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY
from fairseq.models.speech_to_text.s2t_transformer import S2TTransformerModel

from ..checkpoint import signature as model_signature
from ..data.config import ConfigError, SMoEDataConfig
from ..models import s2t_lmoe, s2t_smoe
from ..modules.switch_layer import SwitchLinear
from ..prep.common import atomic_path
from ..routing import RoutingTable, is_lang_tag, lang_tag
from ..tasks.dictionary_only import DictionaryOnlyTask
from .export import ExportError, checkpoint_model_args

logger = logging.getLogger("fairseq_smoe.cli.upcycle")

SIGNATURE_KEY = model_signature.SIGNATURE_KEY
FFN_KEY = re.compile(r"^(encoder\.transformer_layers|decoder\.layers)\.(\d+)\.fc([12])\.(weight|bias)$")
GATE_KEY = re.compile(r"^(encoder\.transformer_layers|decoder\.layers)\.\d+\.fc1\.gate\.weight$")
# tensors with one row per dictionary entry, and how the rows of appended tokens start
EMBED_KEY = "decoder.embed_tokens.weight"
OUTPUT_ROW_KEYS = ("decoder.output_projection.weight", "encoder.ctc_proj.weight", "encoder.ctc_proj.bias")
# the dimensions that make a model's size (decoder_ffn_embed_dim is the variant's: DecFFNx2 doubles it)
SIZE_FIELDS = (
    "input_channels", "conv_kernel_sizes", "conv_channels", "conv_out_channels", "conv_version",
    "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_layers", "encoder_attention_heads",
    "decoder_embed_dim", "decoder_layers", "decoder_attention_heads", "decoder_input_dim", "decoder_output_dim",
)
# model arguments a target architecture sets itself (which experts, how many, the decoder FFN width)
VARIANT_FIELDS = ("encoder_smoe", "decoder_smoe", "encoder_lmoe", "decoder_lmoe", "encoder_experts",
                  "decoder_experts", "decoder_ffn_embed_dim")


class UpcycleError(ValueError):
    """The dense checkpoint, the target or the output cannot be used; the message names the file or flag."""


# ------------------------------------------------------------------------------------------------ registries
def target_architectures() -> Dict[str, type]:
    """Every named S-MoE and learned-gate architecture -> its model class."""
    out = {name: s2t_smoe.S2TSMoEModel for name in s2t_smoe.ARCHITECTURES}
    out.update({name: s2t_lmoe.S2TLMoEModel for name in s2t_lmoe.ARCHITECTURES})
    return out


def arch_defaults(arch: str) -> Namespace:
    """What ``--arch`` alone sets (fairseq's architecture function on an empty namespace)."""
    args = Namespace()
    ARCH_CONFIG_REGISTRY[arch](args)
    return args


# --------------------------------------------------------------------------------------------------- source
def load_dense(path: str) -> Tuple[dict, Namespace, str]:
    """The checkpoint, its model arguments and its kind (``plugin`` Base or ``stock`` s2t_transformer).

    Refuses what is not a dense Base: a model with experts (S-MoE or learned gate), DecFFNx2 (a wider decoder FFN
    than the Base the systems are sized against), any other model.
    """

    if not Path(path).is_file():
        raise UpcycleError(f"--dense {path}: no such file")
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    try:
        args = checkpoint_model_args(state)
    except ExportError as e:
        raise UpcycleError(f"--dense {path}: {e}") from None
    arch = getattr(args, "arch", None) or getattr(args, "_name", None)
    cls = ARCH_MODEL_REGISTRY.get(arch)
    if cls is s2t_lmoe.S2TLMoEModel:
        raise UpcycleError(f"--dense {path} is not dense: architecture {arch} is a learned-gate MoE; upcycle from "
                           f"the dense Base (s2t_smoe_base*) or a stock s2t_transformer checkpoint")
    if cls is s2t_smoe.S2TSMoEModel:
        kind = "plugin"
        if getattr(args, "encoder_smoe", False) or getattr(args, "decoder_smoe", False):
            raise UpcycleError(f"--dense {path} is not dense: architecture {arch} has S-MoE experts; upcycle from "
                               f"the dense Base (s2t_smoe_base*)")
        if args.decoder_ffn_embed_dim != args.encoder_ffn_embed_dim:
            raise UpcycleError(
                f"--dense {path} ({arch}) has a decoder FFN {args.decoder_ffn_embed_dim} wide and an encoder FFN "
                f"{args.encoder_ffn_embed_dim} wide: it is not the dense Base the systems are sized against "
                f"(DecFFNx2 is a target); upcycle from the Base (s2t_smoe_base*)")
    elif cls is S2TTransformerModel:
        kind = "stock"
    else:
        raise UpcycleError(f"--dense {path}: architecture {arch!r} is neither this plugin's dense Base "
                           f"(s2t_smoe_base*) nor a stock fairseq s2t_transformer")
    for key, value in state["model"].items():
        if GATE_KEY.match(key) or (FFN_KEY.match(key) and value.dim() == (3 if key.endswith("weight") else 2)):
            raise UpcycleError(f"--dense {path} is not dense: {key} has shape {tuple(value.shape)} (experts)")
    return state, args, kind


def check_size(src_args: Namespace, src_arch: str, arch: str, dense: str, keep_source_size: bool) -> List[str]:
    """The size fields where ``arch`` differs from the dense model's; an error unless ``keep_source_size``."""
    src_default, tgt_default = arch_defaults(src_arch), arch_defaults(arch)
    wrong = []
    for field in SIZE_FIELDS:
        want, default, have = (getattr(tgt_default, field, None), getattr(src_default, field, None),
                               getattr(src_args, field, None))
        if want is not None and want != default and want != have:
            wrong.append(f"{field}: {arch} has {want}, the dense model {have}")
    if wrong and not keep_source_size:
        raise UpcycleError(
            f"size mismatch: --arch {arch} is not the size of --dense {dense} ({src_arch}): " + "; ".join(wrong)
            + ". Choose the architecture of the dense model's size, or pass --keep-source-size to build "
              f"{arch}'s variant at the dense model's dimensions")
    return wrong


def target_args(src_args: Namespace, arch: str, table: RoutingTable, data: Optional[str],
                config_yaml: str) -> Namespace:
    """The dense model's arguments (dimensions, activation, norms, dropout...) with ``arch``'s variant."""

    args = copy.deepcopy(src_args)
    defaults = arch_defaults(arch)
    ratio = defaults.decoder_ffn_embed_dim // defaults.encoder_ffn_embed_dim  # DecFFNx2: 2, the others 1
    decoder_ffn = src_args.decoder_ffn_embed_dim * ratio
    for key in VARIANT_FIELDS:
        if hasattr(args, key):
            delattr(args, key)
    args.arch = args._name = arch
    args.decoder_ffn_embed_dim = decoder_ffn
    args.task = "speech_to_text_smoe"
    # the weights come from the dense checkpoint: building the target must not load an encoder from elsewhere
    args.load_pretrained_encoder_from = None
    for key, value in table.to_args().items():
        setattr(args, key, value)
    if data is not None:
        args.data, args.config_yaml = str(data), config_yaml
    ARCH_CONFIG_REGISTRY[arch](args)
    if arch in s2t_lmoe.ARCHITECTURES:  # the criterion that optimises the gate's balancing loss (+ CTC if trained)
        args.criterion = s2t_lmoe.MOE_ASR_CTC_CRITERION if _ctc_weight(args) > 0 else s2t_lmoe.MOE_CRITERION
    return args


def _ctc_weight(args: Namespace) -> float:
    return float(getattr(args, "ctc_weight", 0.0) or 0.0)


def criterion_flags(args: Namespace, arch: str) -> List[str]:
    """The criterion flags the continued run needs. fairseq-train builds the model from its own flags and loads
    ``--finetune-from-model`` strictly: a dense model trained with CTC passes its CTC head (``encoder.ctc_proj``)
    on, and a run without ``--ctc-weight`` then fails on those keys."""
    ctc = _ctc_weight(args)
    if arch in s2t_lmoe.ARCHITECTURES:
        name = s2t_lmoe.MOE_ASR_CTC_CRITERION if ctc > 0 else s2t_lmoe.MOE_CRITERION
    elif ctc > 0:
        name = "label_smoothed_cross_entropy_asr_ctc"
    else:
        return []
    return ["--criterion", name] + (["--ctc-weight", str(ctc)] if ctc > 0 else [])


# --------------------------------------------------------------------------------------------- dictionaries
def _data_config(data: str, config_yaml: str):
    path = Path(data) / config_yaml
    if not path.is_file():
        raise UpcycleError(f"--data {data}: no {config_yaml} there (--config-yaml)")
    return S2TDataConfig(path), path


def _dictionary_of_data(data: str, config_yaml: str) -> Path:
    cfg, path = _data_config(data, config_yaml)
    dict_path = Path(data) / cfg.vocab_filename
    if not dict_path.is_file():
        raise UpcycleError(f"{path}: vocab_filename {cfg.vocab_filename} is not a file in {data}")
    return dict_path


def routing_table(src_args: Namespace, kind: str, data: Optional[str], config_yaml: str) -> Tuple[RoutingTable, str]:
    """The target's routes and where they came from: ``--data``'s config.yaml, the dense Base's, or the defaults."""
    if data is not None:
        cfg, path = _data_config(data, config_yaml)
        try:
            return SMoEDataConfig.from_dict(cfg.config.get("smoe"), where=str(path)).routing_table, str(path)
        except ConfigError as e:
            raise UpcycleError(str(e)) from None
    if kind == "plugin":
        return s2t_smoe.routing_table_from_args(src_args), "the dense checkpoint's model arguments"
    return RoutingTable(), "the defaults (no --data)"


def _field(group, name: str):
    """``name`` of a cfg group: a DictConfig/dict (dataclass tasks) or a Namespace (legacy ones, e.g. S2T)."""
    if group is None:
        return None
    return group.get(name) if hasattr(group, "get") else getattr(group, name, None)


def dense_dictionary_path(state: dict, kind: str, dense: str, dense_dict: Optional[str], data: Optional[str],
                          config_yaml: str) -> Path:
    """The dictionary the dense model was trained with.

    ``--dense-dict``; else, for the plugin's Base, ``--data``'s (upcycling keeps the dictionary); else the
    ``vocab_filename`` of the data directory the checkpoint was trained on (``cfg.task.data``), if it is there.
    """
    if dense_dict is not None:
        if not Path(dense_dict).is_file():
            raise UpcycleError(f"--dense-dict {dense_dict}: no such file")
        return Path(dense_dict)
    if kind == "plugin" and data is not None:
        return _dictionary_of_data(data, config_yaml)
    task_cfg = state["cfg"].get("task") if state.get("cfg") is not None else None
    train_data, train_yaml = _field(task_cfg, "data"), _field(task_cfg, "config_yaml") or "config.yaml"
    if train_data and (Path(train_data) / train_yaml).is_file():
        return _dictionary_of_data(train_data, train_yaml)
    raise UpcycleError(f"--dense {dense}: its training data directory ({train_data}) is not here; name the "
                       f"dictionary it was trained with by --dense-dict" + ("" if kind == "stock" else " or --data"))


def extend_dictionary(d: Dictionary, table: RoutingTable, langs: Optional[List[str]],
                      data_dict: Optional[Dictionary]) -> List[str]:
    """Append the guiding tokens ``d`` lacks (after its entries, so old ids stay); returns them, in order."""
    if langs:
        tags = [lang_tag(lang) for lang in sorted(set(langs))]
    else:
        tags = [s for s in (data_dict.symbols if data_dict is not None else []) if is_lang_tag(s)]
        tags = tags or [s for s in d.symbols if is_lang_tag(s)]
        if not tags:
            raise UpcycleError("the dense dictionary has no <lang:xx> tags and --data gives none: name the target "
                               "languages with --langs (e.g. --langs en,es)")
    wanted = table.guiding_symbols() + tags
    added = [t for t in wanted if t not in d.indices]
    for t in added:
        d.add_symbol(t, n=1)
    return added


# -------------------------------------------------------------------------------------------------- weights
def upcycle_state_dict(src: Dict[str, torch.Tensor], model: torch.nn.Module, old_vocab: int,
                       gate_std: float = 0.0, seed: int = 1) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """The target ``model``'s weights from the dense state ``src``; returns them and counts per kind of copy."""
    generator = torch.Generator().manual_seed(seed)
    tied = bool(getattr(model.decoder, "share_input_output_embed", False))
    out, used = {}, {SIGNATURE_KEY}
    counts = {"copied": 0, "experts": 0, "widened": 0, "gates": 0, "vocab_extended": 0}
    for key, want in model.state_dict().items():
        if key == SIGNATURE_KEY:
            continue
        if GATE_KEY.match(key):
            gate = torch.zeros_like(want)
            if gate_std > 0:
                gate.normal_(0.0, gate_std, generator=generator)
            out[key] = gate
            counts["gates"] += 1
            continue
        if key not in src:
            raise UpcycleError(f"the dense checkpoint has no {key}, which {type(model).__name__} needs")
        have = src[key].to(want.dtype) if src[key].is_floating_point() else src[key]
        used.add(key)
        ffn = FFN_KEY.match(key)
        if have.shape == want.shape:
            out[key] = have.clone()
            counts["copied"] += 1
        elif ffn and want.dim() == have.dim() + 1 and want.shape[1:] == have.shape:
            experts = want.shape[0]
            value = have.unsqueeze(0).repeat(experts, *([1] * have.dim()))
            module = model.get_submodule(key.rsplit(".", 1)[0])
            if isinstance(module, SwitchLinear) and module.role == "fc2":
                value = value * experts  # the router's 1/E probability scales it back
            out[key] = value
            counts["experts"] += 1
        elif ffn and want.dim() == have.dim():
            out[key] = _widen(key, have, want, ffn.group(3))
            counts["widened"] += 1
        elif (key == EMBED_KEY or key in OUTPUT_ROW_KEYS) and want.shape[0] > have.shape[0] == old_vocab \
                and want.shape[1:] == have.shape[1:]:
            new = want.shape[0] - old_vocab
            if key == EMBED_KEY or (tied and key == "decoder.output_projection.weight"):
                extra = have.mean(dim=0, keepdim=True).expand(new, *have.shape[1:])
            else:
                extra = have.new_zeros(new, *have.shape[1:])
            out[key] = torch.cat([have, extra], dim=0)
            counts["vocab_extended"] += 1
        else:
            raise UpcycleError(f"size mismatch at {key}: the dense checkpoint has {tuple(have.shape)}, the target "
                               f"needs {tuple(want.shape)}")
    unused = sorted(set(src) - used)
    if unused:
        raise UpcycleError(f"the dense checkpoint has weights the target has no place for: {unused[:5]}"
                           + (" ..." if len(unused) > 5 else ""))
    return out, counts


def _widen(key: str, have: torch.Tensor, want: torch.Tensor, fc: str) -> torch.Tensor:
    """A k-times wider FFN computing the same function: k copies of each hidden unit, their fc2 weights / k."""
    axis = 0 if fc == "1" else (1 if have.dim() == 2 else None)
    if axis is None:  # fc2's bias: the output size is unchanged
        raise UpcycleError(f"size mismatch at {key}: the dense checkpoint has {tuple(have.shape)}, the target "
                           f"needs {tuple(want.shape)}")
    k, rest = divmod(want.shape[axis], have.shape[axis])
    other = [d for i, d in enumerate(have.shape) if i != axis] == [d for i, d in enumerate(want.shape) if i != axis]
    if rest or k < 2 or not other:
        raise UpcycleError(f"size mismatch at {key}: the dense checkpoint has {tuple(have.shape)}, the target "
                           f"needs {tuple(want.shape)} (a decoder FFN can only be widened by a whole factor)")
    return torch.cat([have] * k, dim=axis) if fc == "1" else torch.cat([have / k] * k, dim=axis)


# --------------------------------------------------------------------------------------------------- driver
def _train_flags(args: Namespace, arch: str) -> List[str]:
    """Flags fairseq-train needs besides ``--arch`` to build this model (it builds from its command line)."""
    given, flags = Namespace(), []
    for field in SIZE_FIELDS + ("decoder_ffn_embed_dim", "moe_eval_capacity_factor"):
        derived = copy.deepcopy(given)
        ARCH_CONFIG_REGISTRY[arch](derived)  # what the flags so far give (decoder dims follow the encoder's)
        value = getattr(args, field, None)
        if value is not None and value != getattr(derived, field, None):
            setattr(given, field, value)
            flags += [f"--{field.replace('_', '-')}", str(value)]
    return flags


def _plain_cfg(cfg):
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # what fairseq's trainer saves
    return dict(cfg) if cfg is not None else {}


def upcycle(dense: str, arch: str, out: str, data: Optional[str] = None, config_yaml: str = "config.yaml",
            dense_dict: Optional[str] = None, langs: Optional[List[str]] = None, keep_source_size: bool = False,
            gate_std: float = 0.0, seed: int = 1) -> Dict:
    """Write the upcycled checkpoint (and, for a stock source, its dictionary); returns what was done."""
    targets = target_architectures()
    if arch not in targets:
        raise UpcycleError(f"--arch {arch}: unknown architecture; choose one of {sorted(targets)}")
    out_path = Path(out)
    if out_path.exists():
        raise UpcycleError(f"--out {out} exists; upcycling does not overwrite a checkpoint (remove it or choose "
                           f"another path)")
    if gate_std < 0:
        raise UpcycleError(f"--gate-std {gate_std}: must be >= 0")
    if data is not None and not Path(data).is_dir():
        raise UpcycleError(f"--data {data}: no such directory")
    state, src_args, kind = load_dense(dense)
    src_arch = getattr(src_args, "arch", None) or src_args._name
    size_overrides = check_size(src_args, src_arch, arch, dense, keep_source_size)

    table, routes_from = routing_table(src_args, kind, data, config_yaml)
    dict_path = dense_dictionary_path(state, kind, dense, dense_dict, data, config_yaml)
    tgt_dict = Dictionary.load(str(dict_path))
    old_vocab = len(tgt_dict)
    embed_rows = state["model"][EMBED_KEY].shape[0]
    if embed_rows != old_vocab:
        raise UpcycleError(f"{dict_path} has {old_vocab} entries but --dense {dense} has {embed_rows} embedding "
                           f"rows: name the dictionary it was trained with (--dense-dict)")
    saved_sig = state["model"].get(SIGNATURE_KEY)
    if saved_sig is not None:
        sig = model_signature.decode(saved_sig)
        if sig.get("dictionary_md5") != model_signature.dictionary_md5(tgt_dict):
            raise UpcycleError(f"--dense {dense} was trained with another dictionary than {dict_path} (md5 "
                               f"{sig.get('dictionary_md5')} vs {model_signature.dictionary_md5(tgt_dict)})")

    added: List[str] = []
    new_dict_path = None
    if kind == "stock":
        data_dict = Dictionary.load(str(_dictionary_of_data(data, config_yaml))) if data is not None else None
        added = extend_dictionary(tgt_dict, table, langs, data_dict)
        if added:
            new_dict_path = out_path.with_suffix(".dict.txt")
            if new_dict_path.exists():
                raise UpcycleError(f"--out {out}: the dictionary to write next to it, {new_dict_path}, exists")
    missing = [t for t in table.guiding_symbols() if t not in tgt_dict.indices]
    if missing:
        raise UpcycleError(f"{dict_path} lacks the guiding token(s) {missing} of the decoder routes "
                           f"{list(table.decoder_routes)} ({routes_from})")

    args = target_args(src_args, arch, table, data, config_yaml)
    task = DictionaryOnlyTask(len(tgt_dict))
    task.target_dictionary = task.tgt_dict = tgt_dict
    model = targets[arch].build_model(args, task)
    for module in model.modules():  # a tied learned gate puts every token into one expert: give it the room
        if isinstance(module, SwitchLinear) and module.state.eval_capacity_factor < module.state.num_experts:
            module.state.eval_capacity_factor = float(module.state.num_experts)
            args.moe_eval_capacity_factor = float(module.state.num_experts)
    shown_dict = str(new_dict_path or dict_path)
    model_signature.attach(model, table, tgt_dict, shown_dict)
    weights, counts = upcycle_state_dict(state["model"], model, old_vocab, gate_std, seed)
    model.load_state_dict(weights, strict=True)
    n_params = sum(p.numel() for p in model.parameters())

    cfg = _plain_cfg(state.get("cfg"))
    cfg["model"] = args
    task_cfg = cfg.get("task")
    task_fields = {"_name": "speech_to_text_smoe", "data": str(data) if data else getattr(args, "data", ""),
                   "config_yaml": config_yaml}
    if isinstance(task_cfg, Namespace):
        for k, v in task_fields.items():
            setattr(task_cfg, k, v)
    else:
        cfg["task"] = dict(task_cfg or {}, **task_fields)
    info = {"source": str(Path(dense).resolve()), "source_arch": src_arch, "source_kind": kind, "arch": arch,
            "encoder_routes": list(table.encoder_routes), "decoder_routes": list(table.decoder_routes),
            "appended_tokens": added, "dictionary": shown_dict, "gate_std": gate_std, **counts}
    checkpoint = {
        "args": None,
        "cfg": cfg,
        "model": model.state_dict(),
        "optimizer_history": [{"criterion_name": "none", "optimizer_name": "none", "lr_scheduler_state": {},
                               "num_updates": 0}],
        "task_state": {},
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}, "smoe_upcycle": info},
        "last_optimizer_state": None,
    }
    if new_dict_path is not None:
        with atomic_path(new_dict_path) as tmp:
            tgt_dict.save(str(tmp))
        logger.info(f"dictionary: appended {len(added)} guiding token(s) {added} to the {old_vocab} entries of "
                    f"{dict_path} (ids {old_vocab}..{len(tgt_dict) - 1}: embedding rows at the mean of the dense "
                    f"ones, output rows at zeros); wrote {new_dict_path}: make it config.yaml's vocab_filename")
    with atomic_path(out_path) as tmp:
        torch.save(checkpoint, tmp)
    flags = _train_flags(args, arch)
    info.update(out=str(out_path), parameters=n_params, train_flags=flags, size_overrides=size_overrides,
                new_dictionary=str(new_dict_path) if new_dict_path else None,
                criterion_flags=criterion_flags(args, arch))
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fairseq_smoe.cli.upcycle", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True, help="dense checkpoint: the plugin's Base or a stock s2t_transformer")
    p.add_argument("--arch", required=True, help="target architecture (s2t_smoe / s2t_lmoe), e.g. s2t_dec_smoe_xs")
    p.add_argument("--out", required=True, help="checkpoint to write (must not exist)")
    p.add_argument("--data", help="data directory the target will train on: its config.yaml gives the routes "
                                  "(and, for the plugin's Base, the dictionary)")
    p.add_argument("--config-yaml", default="config.yaml")
    p.add_argument("--dense-dict", help="the dictionary the dense model was trained with (default: --data's for "
                                        "the plugin's Base, else that of the checkpoint's own training data)")
    p.add_argument("--langs", help="stock source: comma-separated target languages whose <lang:xx> tags to add "
                                   "(default: the tags of --data's dictionary, else of the dense one)")
    p.add_argument("--keep-source-size", action="store_true",
                   help="build --arch's variant at the dense model's dimensions even where --arch's size differs")
    p.add_argument("--gate-std", type=float, default=0.0,
                   help="learned-gate targets: gate weights start at N(0, S^2); 0 (default): zeros, exactly the "
                        "dense output at evaluation")
    p.add_argument("--seed", type=int, default=1, help="seed of the --gate-std draw")
    a = p.parse_args(argv)
    logging.basicConfig(format="%(levelname)s | %(name)s | %(message)s", level=logging.INFO, stream=sys.stderr)
    try:
        info = upcycle(a.dense, a.arch, a.out, a.data, a.config_yaml, a.dense_dict,
                       [x for x in a.langs.split(",") if x] if a.langs else None, a.keep_source_size, a.gate_std,
                       a.seed)
    except UpcycleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {info['out']}: {info['arch']}, {info['parameters']:,} parameters, from {info['source_kind']} "
          f"{info['source_arch']} {a.dense} (encoder routes {info['encoder_routes']}, decoder routes "
          f"{info['decoder_routes']}; {info['experts']} expert tensors, {info['widened']} widened, {info['gates']} "
          f"gates at {'zeros' if not a.gate_std else f'N(0, {a.gate_std}^2)'}, {info['copied']} copied)")
    if info["new_dictionary"]:
        print(f"wrote {info['new_dictionary']}: the dense dictionary + {info['appended_tokens']}; make it the "
              f"vocab_filename of the data's config.yaml")
    criterion = "".join(f" {flag}" for flag in info["criterion_flags"])
    print("continue training with: fairseq-train DATA --user-dir fairseq_smoe --task speech_to_text_smoe "
          f"--config-yaml {a.config_yaml} --arch {info['arch']} " + " ".join(info["train_flags"]) + criterion
          + f" --finetune-from-model {info['out']} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
