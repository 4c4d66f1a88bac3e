"""Route-robustness variants of a test set or a model, decodable with plain ``fairseq-generate`` (issue 15, section 3).

The study's label-robustness question (the paper's open question 3) is how much each system loses when its routes
are not the ones its training labels promise. Each variant is a file that stock ``fairseq-generate`` decodes as
it decodes the original, with no new generation flag, so the variant differs from the original run in exactly
one thing:

* :func:`swap_bandwidth`: the manifest with every row's ``bandwidth`` label swapped (NB audio through the WB
  encoder expert and vice versa): the wrong encoder route;
* :func:`spectral_view`: the rows with the ``bandwidth`` label left blank, every clip at 16 kHz and a config yaml
  with ``smoe.bandwidth_detection: spectral``, so the dataset derives each row's encoder route from the audio's
  spectrum (:func:`fairseq_smoe.data.manifest.derive_bandwidth`) instead of from the label;
* :func:`reroute_decoder`: a checkpoint whose decoder experts are re-assigned, each ASR route getting a non-ASR
  route's expert and vice versa: the decoder routed to the other task (the guiding prefix, the encoder, the CTC
  head and which rows count as ASR stay as they were).

:func:`make_view` writes the ``config.yaml`` of a *view directory*: a folder of study manifests that is not the
corpus but reads the corpus's audio, vocabulary and SentencePiece model (every path in it absolute), so that
``fairseq-generate VIEW_DIR --gen-subset NAME`` decodes ``VIEW_DIR/NAME.tsv`` exactly as the corpus's own copy.

Everything about routes (the bandwidth labels, which decoder routes are ASR routes) is asked of
:mod:`fairseq_smoe.routing`; manifests are read and written as the prep pipelines do (:mod:`fairseq_smoe.prep.common`).
"""

import copy
import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import yaml

from ..data import audio
from ..data.config import SMoEDataConfig
from ..data.manifest import manifest_base, read_manifest, waveform_bandwidth
from ..prep.common import atomic_path, write_manifest
from ..routing import BANDWIDTHS, RoutingTable

BANDWIDTH_COLUMN = "bandwidth"
SPECTRAL_CONFIG = "config_spectral.yaml"
# config.yaml entries that name a file relative to the data dir: fairseq joins vocab_filename to the data dir
# itself (SpeechToTextTask.setup_task), and turns the tokenizer entries into paths relative to the yaml's folder
# (S2TDataConfig._auto_convert_to_abs_path); a view dir holds none of those files, so the view's are absolute
_PATH_KEYS = ("vocab_filename", "speaker_set_filename")
_TOKENIZER_KEYS = ("bpe_tokenizer", "pre_tokenizer")


class VariantError(ValueError):
    """A manifest, config or checkpoint a variant cannot be made of; the message names the file (and row)."""


# --------------------------------------------------------------------------------------------- manifests
def _read(path: Path) -> Tuple[List[Dict[str, str]], List[str]]:
    """A manifest's rows and its header (in file order), read as the dataset reads it."""
    rows = read_manifest(str(path))
    return rows, list(rows[0].keys())


def _bandwidth_swap() -> Dict[str, str]:
    if len(BANDWIDTHS) != 2:
        raise VariantError(f"swapping bandwidth labels needs exactly two bandwidths; routing.BANDWIDTHS is "
                           f"{list(BANDWIDTHS)}")
    a, b = BANDWIDTHS
    return {a: b, b: a}


def swap_bandwidth(src_tsv: Path, dst_tsv: Path) -> int:
    """Copy a manifest with every row's ``bandwidth`` label swapped (nb <-> wb); returns the rows written.

    Why: decoding the copy routes every clip through the other bandwidth's encoder expert, all else equal (same
    audio, features, targets and decoder routes), which measures how much a system relies on a correct label.
    The columns and their order are kept, so swapping twice gives the original file back byte for byte. A row
    whose label is blank or not one of :data:`fairseq_smoe.routing.BANDWIDTHS` has no "other" bandwidth: that is
    an error naming the file, line and row id. The copy is written atomically (whole or not at all).
    """
    src_tsv, dst_tsv = Path(src_tsv), Path(dst_tsv)
    swap = _bandwidth_swap()
    rows, header = _read(src_tsv)
    if BANDWIDTH_COLUMN not in header:
        raise VariantError(f"{src_tsv}: no {BANDWIDTH_COLUMN!r} column to swap (header is {header})")
    out = []
    for line, row in enumerate(rows, start=2):
        label = row[BANDWIDTH_COLUMN].strip()
        if label not in swap:
            raise VariantError(f"{src_tsv}:{line} (id {row['id']!r}): bandwidth {row[BANDWIDTH_COLUMN]!r} is "
                               f"{'empty' if not label else 'unknown'}; swapping needs one of {list(BANDWIDTHS)}")
        out.append(dict(row, **{BANDWIDTH_COLUMN: swap[label]}))
    write_manifest(dst_tsv, out, columns=header)
    return len(out)


# ------------------------------------------------------------------------------------------------ configs
def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise VariantError(f"{path}: config not found")
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise VariantError(f"{path}: not a mapping")
    return cfg


def view_config(data_dir: Path, config_in: str = "config.yaml") -> dict:
    """``data_dir/config_in`` with every path in it absolute, so that it reads the same files from any folder.

    ``audio_root`` becomes the absolute folder relative ``audio`` fields resolve against for the corpus's own
    manifests (its ``audio_root``, else the data dir, where the corpus's manifests are).
    """
    data_dir = Path(data_dir).resolve()
    cfg = copy.deepcopy(_load_yaml(data_dir / config_in))
    for key in _PATH_KEYS:
        value = cfg.get(key)
        if key == "vocab_filename" and value is None:
            value = "dict.txt"  # fairseq's default
        if isinstance(value, str) and not os.path.isabs(value):
            cfg[key] = str(data_dir / value)
    for key in _TOKENIZER_KEYS:
        tok = cfg.get(key)
        if isinstance(tok, dict):  # fairseq's rule: a value that names a file relative to the yaml's folder
            cfg[key] = {k: (str(data_dir / v) if isinstance(v, str) and not os.path.isabs(v)
                            and not Path(v).exists() and (data_dir / v).exists() else v) for k, v in tok.items()}
    cmvn = cfg.get("global_cmvn")
    if isinstance(cmvn, dict) and isinstance(cmvn.get("stats_npz_path"), str):
        cmvn["stats_npz_path"] = str(data_dir / cmvn["stats_npz_path"])  # an absolute one stays (join keeps it)
    root = cfg.get("audio_root") or ""
    cfg["audio_root"] = root if os.path.isabs(root) else str(data_dir / root) if root else str(data_dir)
    return cfg


def _write_yaml(path: Path, cfg: dict) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def make_view(data_dir: Path, view_dir: Path, config_in: str = "config.yaml") -> Path:
    """Create ``view_dir/config.yaml``: the corpus's config with absolute paths (see :func:`view_config`).

    Why: the study writes its variant manifests (swapped labels, spectral views) into a folder of its own,
    ``<exp>/testsets/``, not into the corpus; ``fairseq-generate VIEW_DIR --config-yaml config.yaml --gen-subset
    NAME`` then reads ``VIEW_DIR/NAME.tsv`` with the corpus's dictionary, SentencePiece model and audio. A
    manifest copied there unchanged decodes exactly as in the corpus. Returns the config's path.
    """
    view_dir = Path(view_dir)
    view_dir.mkdir(parents=True, exist_ok=True)
    return _write_yaml(view_dir / "config.yaml", view_config(data_dir, config_in))


# ------------------------------------------------------------------------------------------ spectral view
def _upsampled_name(ref: audio.AudioRef) -> str:
    digest = hashlib.sha1(str(Path(ref.path).resolve()).encode() + f":{ref.offset}:{ref.length}".encode())
    return f"{Path(ref.path).stem}_{digest.hexdigest()[:12]}.wav"


def _write_float_wav(path: Path, wav: np.ndarray, sr: int) -> None:
    """32-bit float WAV, atomically: the samples read back are exactly the ones written (16-bit PCM would
    round them, and the features would no longer be those of the original file)."""
    import soundfile as sf

    with atomic_path(path) as tmp:
        sf.write(str(tmp), wav, sr, subtype="FLOAT", format="WAV")


def spectral_view(data_dir: Path, src_tsv: Path, dst_tsv: Path, audio_dir: Path, config_in: str = "config.yaml",
                  config_out: Optional[Path] = None) -> dict:
    """The rows of ``src_tsv`` with the bandwidth label left blank, to be routed by spectral detection.

    Why: a deployed system may not know a call's bandwidth; this measures each system when its encoder route comes
    from the audio (``smoe.bandwidth_detection: spectral``, threshold ``smoe.spectral_threshold_db`` of
    ``config_in``) instead of from the label. The dataset applies spectral detection only to audio at 16 kHz or
    above (a lower rate is narrowband by definition), and the NB clips of this project's corpora are 8 kHz files:
    each clip below 16 kHz is written under ``audio_dir`` at 16 kHz, resampled by the plugin's own resampler
    (:func:`fairseq_smoe.data.audio.resample`, the one the dataset applies before features) and stored as float
    WAV, so the model sees exactly the features of the original file. Clips at 16 kHz and above are not copied:
    the row names the original (absolute path). A file already written is kept (a rerun resumes).

    Writes ``dst_tsv`` (every ``audio`` field absolute, ``bandwidth`` blank; the other columns as in ``src_tsv``)
    and ``config_out`` (default ``dst_tsv``'s folder / ``config_spectral.yaml``): :func:`view_config` with
    ``smoe.bandwidth_detection: spectral``. Decode it with ``fairseq-generate DIR --config-yaml CONFIG_OUT
    --gen-subset NAME`` where ``DIR/NAME.tsv`` is ``dst_tsv`` (an absolute ``--config-yaml`` works from any
    ``DIR``). Returns ``{"rows": n, "config": path, "detected": {label: {route: count}}}``: what spectral
    detection gives per original label, from :func:`fairseq_smoe.data.manifest.waveform_bandwidth` on the audio
    the dataset will read, with the same config -- the routes the decoding will use.
    """
    data_dir, src_tsv, dst_tsv, audio_dir = Path(data_dir), Path(src_tsv), Path(dst_tsv), Path(audio_dir)
    cfg = view_config(data_dir, config_in)
    cfg.setdefault("smoe", {})
    if cfg["smoe"] is None:
        cfg["smoe"] = {}
    cfg["smoe"]["bandwidth_detection"] = "spectral"
    config_out = Path(config_out) if config_out is not None else dst_tsv.parent / SPECTRAL_CONFIG
    smoe_cfg = SMoEDataConfig.from_dict(cfg["smoe"], where=str(data_dir / config_in))
    base = manifest_base(str(data_dir), cfg["audio_root"], str(src_tsv))
    rows, header = _read(src_tsv)
    if BANDWIDTH_COLUMN not in header:
        header.append(BANDWIDTH_COLUMN)
    detected: Dict[str, Counter] = {}
    done: Dict[str, Tuple[str, str]] = {}  # source -> (audio field of the view, detected route)
    out = []
    for line, row in enumerate(rows, start=2):
        where = f"{src_tsv}:{line} (id {row['id']!r})"
        try:
            ref = audio.resolve(row["audio"], base)
            key = str(ref)
            if key not in done:
                done[key] = _sixteen_khz(ref, audio_dir, smoe_cfg)
        except audio.AudioError as e:
            raise VariantError(f"{where}: {e}") from None
        field, route = done[key]
        label = (row.get(BANDWIDTH_COLUMN) or "").strip()
        detected.setdefault(label, Counter())[route] += 1
        out.append(dict(row, audio=field, **{BANDWIDTH_COLUMN: ""}))
    _write_yaml(config_out, cfg)
    write_manifest(dst_tsv, out, columns=header)
    return {"rows": len(out), "config": str(config_out),
            "detected": {label: dict(sorted(c.items())) for label, c in sorted(detected.items())}}


def _sixteen_khz(ref: audio.AudioRef, audio_dir: Path, smoe_cfg: SMoEDataConfig) -> Tuple[str, str]:
    """The view's ``audio`` field for one source (a 16 kHz copy when below 16 kHz) and its detected route."""
    sr = audio.sample_rate_of(ref)
    if sr is None:
        raise audio.AudioError(f"{ref}: feature files carry no audio; spectral detection needs the waveform")
    if sr >= audio.TARGET_SAMPLE_RATE:
        field = audio.AudioRef(os.path.abspath(ref.path), ref.offset, ref.length)
        wav, sr = audio.read_waveform(field)
        return str(field), waveform_bandwidth(wav, sr, smoe_cfg)
    dst = (audio_dir / _upsampled_name(ref)).resolve()
    if not dst.is_file():
        wav, sr = audio.read_waveform(ref)
        _write_float_wav(dst, audio.resample(wav, sr), audio.TARGET_SAMPLE_RATE)
    wav, sr = audio.read_waveform(audio.AudioRef(str(dst)))  # what the dataset will read
    return str(dst), waveform_bandwidth(wav, sr, smoe_cfg)


# ----------------------------------------------------------------------------------------- decoder reroute
def _decoder_expert_keys(model_state: dict, num_experts: int) -> List[str]:
    """The state-dict keys of the decoder's expert FFNs (``decoder.layers.N.fc{1,2}.{weight,bias}``, stacked
    ``[experts, ...]`` by :class:`fairseq_smoe.modules.expert_layer.ExpertLinear`)."""
    import re

    pattern = re.compile(r"^decoder\.layers\.\d+\.fc[12]\.(weight|bias)$")
    keys = [k for k in model_state if pattern.match(k)]
    for k in keys:
        v = model_state[k]
        if v.dim() != (3 if k.endswith("weight") else 2) or v.shape[0] != num_experts:
            raise VariantError(f"{k} has shape {tuple(v.shape)}, not {num_experts} stacked experts")
    return keys


def reroute_decoder(ckpt_in: Path, ckpt_out: Path, config_yaml: Optional[Path] = None) -> dict:
    """Copy an S-MoE checkpoint with each decoder route's expert replaced by the other task's expert.

    Why: decoding an ASR test set with the copy runs the transcribe prefix through the translate expert (and an
    ST set the other way), all else equal, which measures how much a system's decoder relies on the task route.
    An ASR route (:meth:`fairseq_smoe.routing.RoutingTable.asr_decoder_routes`) gets the first non-ASR route's
    expert, a non-ASR route the first ASR route's; with two routes that is a swap, so rerouting twice gives the
    original back. Routes come from the checkpoint's model arguments (``decoder_routes``); which routes are ASR
    needs the tasks of ``smoe.tasks``/``smoe.asr_tasks``, which the checkpoint does not hold: the defaults, or
    those of ``config_yaml`` (whose decoder routes must be the checkpoint's) when given.

    Every other tensor, the signature (routes and dictionary are unchanged, so it stays valid), the configuration
    and the training state are kept, so the copy loads and decodes with fairseq-generate like the original. Loaded
    through fairseq's ``checkpoint_utils`` (the plugin's ``weights_only`` allow-list), saved with fairseq's atomic
    ``torch_persistent_save``. Refuses (naming the file) a checkpoint with fewer than two decoder experts: the
    dense Base, DecFFNx2, learned-gate models (whose experts no route names). Returns ``{route: route whose
    expert it now holds}``.
    """
    import torch
    from fairseq import checkpoint_utils
    from fairseq.models import ARCH_MODEL_REGISTRY
    from omegaconf import OmegaConf

    from ..cli.export import ExportError, checkpoint_model_args
    from ..models import s2t_smoe

    ckpt_in, ckpt_out = Path(ckpt_in), Path(ckpt_out)
    if not ckpt_in.is_file():
        raise VariantError(f"{ckpt_in}: checkpoint not found")
    if ckpt_out.resolve() == ckpt_in.resolve():
        raise VariantError(f"{ckpt_out}: the rerouted copy must not replace its source {ckpt_in}")
    state = checkpoint_utils.load_checkpoint_to_cpu(str(ckpt_in))
    try:
        args = checkpoint_model_args(state)
    except ExportError as e:
        raise VariantError(f"{ckpt_in}: {e}") from None
    arch = getattr(args, "arch", None) or getattr(args, "_name", None)
    if ARCH_MODEL_REGISTRY.get(arch) is not s2t_smoe.S2TSMoEModel:
        raise VariantError(f"{ckpt_in}: architecture {arch!r} is not an S-MoE model (s2t_smoe); a learned-gate or "
                           f"other model has no decoder experts named by routes")
    table = s2t_smoe.routing_table_from_args(args)
    if not getattr(args, "decoder_smoe", False) or table.num_decoder_routes < 2:
        raise VariantError(f"{ckpt_in}: {arch} has fewer than 2 decoder experts (no decoder S-MoE); nothing to "
                           f"reroute")
    if config_yaml is not None:
        cfg = SMoEDataConfig.from_dict(_load_yaml(Path(config_yaml)).get("smoe"), where=str(config_yaml))
        if cfg.routing_table.decoder_routes != table.decoder_routes:
            raise VariantError(f"{config_yaml}: decoder routes {list(cfg.routing_table.decoder_routes)} are not "
                               f"those of {ckpt_in}: {list(table.decoder_routes)}")
        table = RoutingTable(table.encoder_routes, table.decoder_routes, cfg.routing_table.tasks,
                             cfg.routing_table.asr_tasks)
    routes = list(table.decoder_routes)
    is_asr = table.asr_decoder_routes()
    asr = [r for r, a in zip(routes, is_asr) if a]
    other = [r for r, a in zip(routes, is_asr) if not a]
    if not asr or not other:
        raise VariantError(f"{ckpt_in}: decoder routes {routes} are all {'ASR' if asr else 'non-ASR'} routes: "
                           f"there is no other task's expert to route to")
    mapping = {r: (other[0] if a else asr[0]) for r, a in zip(routes, is_asr)}
    source = torch.tensor([table.route_id("decoder", mapping[r]) for r in routes], dtype=torch.long)
    model = state["model"]
    keys = _decoder_expert_keys(model, len(routes))
    if not keys:
        raise VariantError(f"{ckpt_in}: no decoder expert weights (decoder.layers.N.fc1/fc2) in the state dict")
    for k in keys:
        model[k] = model[k].index_select(0, source).clone()
    if OmegaConf.is_config(state.get("cfg")):  # load_checkpoint_to_cpu made it a DictConfig: save it as the
        # trainer does (a plain container), which the weights_only allow-list loads
        state["cfg"] = OmegaConf.to_container(state["cfg"], resolve=True, enum_to_str=True)
    ckpt_out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_utils.torch_persistent_save(state, str(ckpt_out))
    return mapping
