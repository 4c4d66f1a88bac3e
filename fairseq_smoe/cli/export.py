"""Export one route pair of an S-MoE checkpoint as a dense, stock fairseq ``s2t_transformer`` checkpoint.

    python -m fairseq_smoe.cli.export --checkpoint exp/encdec_smoe/checkpoint_best.pt \\
        --encoder-route wb --decoder-route transcribe --out dense_wb_asr.pt \\
        [--data DATA --config-yaml config.yaml --subsets test_asr_wb --out-data dense_data]

A sample of one (bandwidth, task) pair only ever runs the shared weights plus one expert per FFN, so that path is a
plain Transformer: the chosen experts' weights become the dense ``fc1``/``fc2`` and the other experts are dropped.
The checkpoint holds only plain types (no ``argparse.Namespace``), so stock fairseq loads it under torch's
``weights_only`` unpickler, without ``--user-dir``.

Stock ``speech_to_text`` needs data it can read, which ``--data/--subsets/--out-data`` writes: the rows of the
exported route pair, their fbank as ``.npy`` (computed by this plugin: NB audio resampled to 16 kHz, so stock
fairseq sees exactly the features the S-MoE model saw), targets already split into SentencePiece pieces and starting
with the guiding prefix (stock ``--prefix-size 2``, ``routing.PREFIX_LEN``, forces it from there), a copy of the
dictionary in which the task tokens are renamed ``<lang:transcribe>``-style (stock S2T strips ``<lang:*>`` tokens
from its output, so hypotheses and references carry no guiding tokens, as with the plugin), and a ``config.yaml``
without the plugin's keys. Then::

    fairseq-generate dense_data --task speech_to_text --config-yaml config.yaml --gen-subset test_asr_wb \\
        --path dense_wb_asr.pt --prefix-size 2 --post-process sentencepiece --beam 5 --scoring wer

gives the same hypotheses as the plugin's ``fairseq-generate`` on the S-MoE checkpoint.
"""

import argparse
import copy
import logging
import re
import sys
from argparse import Namespace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml

from fairseq import checkpoint_utils

from ..checkpoint.safety import plain_containers
from ..checkpoint.signature import SIGNATURE_KEY
from ..data.manifest import STOCK_MANIFEST_COLUMNS
from ..prep.common import atomic_path, write_manifest
from ..routing import PREFIX_LEN, RoutingTable, lang_tag
from ..tasks.dictionary_only import DictionaryOnlyTask

logger = logging.getLogger("fairseq_smoe.cli.export")

# model arguments only this plugin knows; stock s2t_transformer must not see them
PLUGIN_MODEL_KEYS = ("encoder_smoe", "decoder_smoe", "encoder_routes", "decoder_routes", "user_dir")
EXPERT_KEY = {
    "encoder": re.compile(r"^encoder\.transformer_layers\.\d+\.fc[12]\.(weight|bias)$"),
    "decoder": re.compile(r"^decoder\.layers\.\d+\.fc[12]\.(weight|bias)$"),
}


class ExportError(ValueError):
    """The checkpoint or the requested routes cannot be exported; the message says why."""


# ----------------------------------------------------------------------------------------------- checkpoint
def _plain(value):
    """Plain dicts/lists of a checkpoint's config or model arguments, so that the dense checkpoint loads under
    ``weights_only`` (what is left unplain, :func:`_assert_plain` names)."""
    return plain_containers(vars(value) if isinstance(value, Namespace) else value)


def checkpoint_model_args(state: dict) -> Namespace:
    model_cfg = state["cfg"]["model"] if state.get("cfg") is not None else state.get("args")
    if model_cfg is None:
        raise ExportError("the checkpoint has no model configuration (cfg.model / args)")
    if isinstance(model_cfg, Namespace):
        return copy.deepcopy(model_cfg)
    return Namespace(**_plain(model_cfg))


def _route_index(table: RoutingTable, name: Optional[str], side: str, has_experts: bool,
                 whose: str = "the checkpoint") -> Optional[int]:
    if name is not None:
        try:
            index = table.route_id(side, name)
        except KeyError as e:
            raise ExportError(f"--{side}-route {e.args[0]} of {whose}") from None
    if not has_experts:
        return None
    if name is None:
        raise ExportError(f"the checkpoint has {side} experts {list(getattr(table, f'{side}_routes'))}: choose one "
                          f"with --{side}-route")
    return index


CTC_PREFIX = "encoder.ctc_proj."


def dense_state_dict(model_state: Dict[str, torch.Tensor], encoder_expert: Optional[int],
                     decoder_expert: Optional[int], num_experts: Dict[str, int]) -> Dict[str, torch.Tensor]:
    """The model state with the chosen experts' weights as dense ``fc1``/``fc2`` and no plugin-only entries."""
    out = {}
    for key, value in model_state.items():
        if key == SIGNATURE_KEY or key.startswith(CTC_PREFIX):  # the CTC projection is for training only
            continue
        for side, expert in (("encoder", encoder_expert), ("decoder", decoder_expert)):
            if expert is not None and EXPERT_KEY[side].match(key):
                if value.dim() < 2 or value.size(0) != num_experts[side]:
                    raise ExportError(f"{key}: expected {num_experts[side]} stacked experts, got shape "
                                      f"{tuple(value.shape)}")
                value = value[expert]
                break
        out[key] = value.clone().contiguous()
    return out


def export_checkpoint(checkpoint: str, encoder_route: Optional[str], decoder_route: Optional[str],
                      out: str) -> Dict:
    """Write the dense checkpoint; returns what was exported (routes, parameter count)."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    from ..models.s2t_smoe import S2TSMoEModel, routing_table_from_args

    if not Path(checkpoint).is_file():
        raise ExportError(f"--checkpoint {checkpoint}: no such file")
    state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint)
    args = checkpoint_model_args(state)
    arch = getattr(args, "arch", None) or getattr(args, "_name", None)
    if ARCH_MODEL_REGISTRY.get(arch) is not S2TSMoEModel:
        raise ExportError(
            f"{checkpoint}: architecture {arch!r} is not an S-MoE model (s2t_smoe_base, s2t_dec_smoe, "
            f"s2t_enc_smoe, s2t_encdec_smoe, ...); a learned-gate MoE routes every token, so it has no dense path"
        )
    table = routing_table_from_args(args)
    enc = _route_index(table, encoder_route, "encoder", bool(getattr(args, "encoder_smoe", False)))
    dec = _route_index(table, decoder_route, "decoder", bool(getattr(args, "decoder_smoe", False)))
    model_state = dense_state_dict(state["model"], enc, dec, {"encoder": table.num_encoder_routes,
                                                               "decoder": table.num_decoder_routes})
    dense_args = copy.deepcopy(args)
    for key in PLUGIN_MODEL_KEYS:
        if hasattr(dense_args, key):
            delattr(dense_args, key)
    dense_args.ctc_weight = 0.0  # no CTC projection in the dense model (dense_state_dict drops it)
    dense_args.arch = dense_args._name = "s2t_transformer"
    dense_args.task = "speech_to_text"
    dense_args.criterion = "label_smoothed_cross_entropy"
    n_params = _check_loads_into_stock_model(dense_args, model_state)

    cfg = _plain(state["cfg"]) if state.get("cfg") is not None else {}
    cfg["model"] = _plain(dense_args)
    old_task = cfg.get("task") if isinstance(cfg.get("task"), dict) else {}
    cfg["task"] = {"_name": "speech_to_text", "data": old_task.get("data", ""), "config_yaml": "config.yaml"}
    cfg["criterion"] = {"_name": "label_smoothed_cross_entropy", "label_smoothing": 0.1,
                        "sentence_avg": False, "report_accuracy": False, "ignore_prefix_size": 0}
    if isinstance(cfg.get("common"), dict):
        cfg["common"]["user_dir"] = None
    num_updates = int(state.get("optimizer_history", [{}])[-1].get("num_updates", 0))
    dense = {
        "cfg": cfg,
        "model": model_state,
        "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion", "optimizer_name": "none",
                               "lr_scheduler_state": {}, "num_updates": num_updates}],
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0},
                        "smoe_export": {"source": str(Path(checkpoint).resolve()),
                                        "encoder_route": encoder_route if enc is not None else None,
                                        "decoder_route": decoder_route if dec is not None else None}},
        "last_optimizer_state": None,
    }
    _assert_plain(dense)
    with atomic_path(Path(out)) as tmp:
        torch.save(dense, tmp)
    return {"out": str(out), "arch": "s2t_transformer", "encoder_route": dense["extra_state"]["smoe_export"][
        "encoder_route"], "decoder_route": dense["extra_state"]["smoe_export"]["decoder_route"],
        "parameters": n_params, "source_arch": arch, "num_updates": num_updates}


def _check_loads_into_stock_model(args: Namespace, model_state: Dict[str, torch.Tensor]) -> int:
    """Build fairseq's own s2t_transformer with these args and load the weights strictly."""
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    args = copy.deepcopy(args)
    ARCH_CONFIG_REGISTRY["s2t_transformer"](args)
    vocab = model_state["decoder.embed_tokens.weight"].shape[0]

    model = ARCH_MODEL_REGISTRY["s2t_transformer"].build_model(args, DictionaryOnlyTask(vocab))
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"the exported weights do not fit fairseq's s2t_transformer: {e}") from None
    return sum(p.numel() for p in model.parameters())


def _assert_plain(obj, where="checkpoint"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _assert_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _assert_plain(v, f"{where}[{i}]")
    elif not (obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor))):
        raise ExportError(f"{where} is a {type(obj).__name__}; stock fairseq could not load it under weights_only")


# ---------------------------------------------------------------------------------------------------- data
def export_data(data: str, config_yaml: str, subsets: List[str], encoder_route: Optional[str],
                decoder_route: Optional[str], out_dir: str) -> Dict[str, int]:
    """Write the rows of one route pair as data stock ``speech_to_text`` reads; rows written per subset."""
    from fairseq import options, tasks

    out = Path(out_dir).resolve()
    parser = options.get_generation_parser()
    gen_args = options.parse_args_and_arch(parser, [data, "--task", "speech_to_text_smoe", "--config-yaml",
                                                    config_yaml, "--cpu"])
    task = tasks.setup_task(gen_args)
    table: RoutingTable = task.routing_table
    whose = f"{data}/{config_yaml}"
    enc_id = None if encoder_route is None else _route_index(table, encoder_route, "encoder", True, whose)
    dec_id = None if decoder_route is None else _route_index(table, decoder_route, "decoder", True, whose)
    tgt_dict = task.tgt_dict

    # the dictionary, with task tokens renamed so that stock S2T strips them from its output like language tags
    renamed = {sym: lang_tag(sym[1:-1]) for sym in table.guiding_symbols()}
    clash = [new for old, new in renamed.items() if new in tgt_dict.indices and old in tgt_dict.indices]
    if clash:
        raise ExportError(f"the dictionary already has {clash}; cannot rename the task tokens")
    with atomic_path(out / "dict.txt") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for i in range(tgt_dict.nspecial, len(tgt_dict)):
                f.write(f"{renamed.get(tgt_dict[i], tgt_dict[i])} {tgt_dict.count[i]}\n")

    written = {}
    for subset in subsets:
        task.load_dataset(subset)
        ds = task.datasets[subset]
        ds.feature_transforms = None  # stock applies the config's transforms itself: store raw fbank
        rows, skipped = [], 0
        for i in range(len(ds)):
            if (enc_id is not None and int(ds.encoder_routes[i]) != enc_id) or (
                    dec_id is not None and int(ds.decoder_routes[i]) != dec_id):
                skipped += 1
                continue
            feats = ds._get_source_audio(i).numpy().astype(np.float32)
            path = out / "fbank" / subset / f"{i:06d}_{_safe_name(ds.ids[i])}.npy"
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, feats)
            prefix = [renamed.get(tgt_dict[int(t)], tgt_dict[int(t)]) for t in ds.prefixes[i].tolist()]
            pieces = ds.get_tokenized_tgt_text(i)
            rows.append({"id": ds.ids[i], "audio": str(path), "n_frames": ds.n_frames[i],
                         "tgt_text": " ".join(prefix + [pieces]), "speaker": ds.speakers[i] if ds.speakers else "",
                         "src_lang": ds.src_langs[i] if ds.src_langs else "", "tgt_lang": ds.tgt_langs[i]})
        if not rows:
            raise ExportError(f"{subset}: no row takes the routes encoder={encoder_route} decoder={decoder_route}")
        if skipped:
            logger.warning(f"{subset}: skipped {skipped} rows of other routes than {encoder_route}/{decoder_route}")
        write_manifest(out / f"{subset}.tsv", rows, STOCK_MANIFEST_COLUMNS)
        written[subset] = len(rows)
        logger.info(f"{subset}: {len(rows)} rows -> {out / (subset + '.tsv')}")

    config = {k: v for k, v in task.data_cfg.config.items()
              if k not in ("smoe", "bpe_tokenizer", "pre_tokenizer", "audio_root", "vocab_filename")}
    config["vocab_filename"] = "dict.txt"
    if isinstance(config.get("global_cmvn"), dict) and config["global_cmvn"].get("stats_npz_path"):
        stats = Path(config["global_cmvn"]["stats_npz_path"])
        config["global_cmvn"]["stats_npz_path"] = str(stats if stats.is_absolute() else Path(data).resolve() / stats)
    with atomic_path(out / config_yaml) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return written


def _safe_name(utt_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", utt_id)


# ----------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fairseq_smoe.cli.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="S-MoE checkpoint (fairseq-train output)")
    p.add_argument("--encoder-route", help="encoder route (bandwidth) to keep, e.g. wb; needed with encoder experts")
    p.add_argument("--decoder-route", help="decoder route (task) to keep, e.g. transcribe; needed with decoder "
                                           "experts")
    p.add_argument("--out", required=True, help="dense s2t_transformer checkpoint to write")
    p.add_argument("--data", help="the S-MoE data directory, to write stock-readable test data from")
    p.add_argument("--config-yaml", default="config.yaml")
    p.add_argument("--subsets", help="comma-separated manifests of --data to convert (rows of other routes skipped)")
    p.add_argument("--out-data", help="directory for the stock data (manifests, fbank .npy, dict.txt, config.yaml)")
    a = p.parse_args(argv)
    logging.basicConfig(format="%(levelname)s | %(name)s | %(message)s", level=logging.INFO, stream=sys.stderr)
    data_flags = [a.data, a.subsets, a.out_data]
    if any(data_flags) and not all(data_flags):
        p.error("--data, --subsets and --out-data go together")
    try:
        info = export_checkpoint(a.checkpoint, a.encoder_route, a.decoder_route, a.out)
        print(f"wrote {info['out']}: s2t_transformer, {info['parameters']:,} parameters "
              f"(encoder route {info['encoder_route']}, decoder route {info['decoder_route']} of {a.checkpoint})")
        if a.data:
            written = export_data(a.data, a.config_yaml, a.subsets.split(","), info["encoder_route"],
                                  info["decoder_route"], a.out_data)
            print(f"wrote {a.out_data}: " + ", ".join(f"{k} ({v} rows)" for k, v in written.items()))
            print(f"decode with: fairseq-generate {a.out_data} --task speech_to_text --config-yaml {a.config_yaml} "
                  f"--gen-subset {a.subsets.split(',')[0]} --path {a.out} --prefix-size {PREFIX_LEN} "
                  f"--post-process sentencepiece --beam 5")
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
