"""Bandwidth-aware speech-to-text dataset: manifest rows -> fbank + guided target + encoder/decoder route ids.

Manifest (TSV, fairseq S2T form plus S-MoE columns)::

    id  audio  n_frames  tgt_text  speaker  task  src_lang  tgt_lang  bandwidth

``task`` is ``asr`` or ``st``; ``bandwidth`` (``nb``/``wb``) may be left out and is then derived from the audio.
Targets become ``<transcribe> <lang:en> ... </s>`` (ASR) or ``<translate> <lang:es> ... </s>`` (ST). The two-token
prefix is fed to the decoder but masked (pad) in ``target``, so no criterion scores it; generation forces it from
``decoder_prefix``, which comes from the manifest (or a command-line override), never from the reference.
"""

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from fairseq.data import Dictionary
from fairseq.data.audio.data_cfg import S2TDataConfig
from fairseq.data.audio.speech_to_text_dataset import SpeechToTextDataset, SpeechToTextDatasetItem

from . import audio
from .config import SMoEDataConfig
from .routing import TASK_TO_GUIDING_TOKEN, RoutingTable, guiding_token, lang_tag

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("id", "audio", "n_frames", "tgt_text", "task", "tgt_lang")
OPTIONAL_COLUMNS = ("speaker", "src_lang", "src_text", "bandwidth")
PREFIX_LEN = 2  # task guiding token + target-language tag


class ManifestError(ValueError):
    """A manifest problem; the message names the file and row."""


@dataclass
class SMoEDatasetItem(SpeechToTextDatasetItem):
    encoder_route: int = 0
    decoder_route: int = 0
    prefix: Optional[torch.Tensor] = None


def read_manifest(path: str) -> List[Dict[str, str]]:
    """Rows of a manifest TSV, with the required columns checked. Row numbers in errors count the header as 1."""
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: manifest not found")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(
            f, delimiter="\t", quotechar=None, doublequote=False, lineterminator="\n", quoting=csv.QUOTE_NONE
        )
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {missing}; header is {header}")
        rows = []
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise ManifestError(f"{path}:{reader.line_num}: wrong number of fields (expected {len(header)})")
            rows.append(row)
    if not rows:
        raise ManifestError(f"{path}: no rows")
    return rows


class SMoESpeechToTextDataset(SpeechToTextDataset):
    def __init__(
        self,
        split: str,
        is_train_split: bool,
        cfg: S2TDataConfig,
        smoe_cfg: SMoEDataConfig,
        audio_paths: List[str],
        n_frames: List[int],
        tgt_texts: List[str],
        speakers: List[str],
        src_langs: List[str],
        tgt_langs: List[str],
        ids: List[str],
        tasks: List[str],
        bandwidths: List[str],
        encoder_routes: List[int],
        decoder_routes: List[int],
        prefixes: List[List[int]],
        tgt_dict: Dictionary,
        pre_tokenizer=None,
        bpe_tokenizer=None,
        audio_root: Optional[str] = None,
    ):
        if cfg.prepend_tgt_lang_tag or cfg.prepend_bos_and_append_tgt_lang_tag:
            raise ValueError(
                "config.yaml: drop prepend_tgt_lang_tag / prepend_bos_and_append_tgt_lang_tag; "
                "speech_to_text_smoe prepends the guiding tokens itself"
            )
        if cfg.use_audio_input:
            raise ValueError("config.yaml: use_audio_input is not supported; S-MoE models take fbank features")
        # set before the parent constructor, which logs repr(self)
        self.smoe_cfg = smoe_cfg
        self.audio_root = audio_root
        self.tasks = tasks
        self.bandwidths = bandwidths
        self.encoder_routes = np.asarray(encoder_routes, dtype=np.int64)
        self.decoder_routes = np.asarray(decoder_routes, dtype=np.int64)
        self.prefixes = torch.tensor(prefixes, dtype=torch.long)
        super().__init__(
            split, is_train_split, cfg, audio_paths, n_frames,
            tgt_texts=tgt_texts, speakers=speakers, src_langs=src_langs, tgt_langs=tgt_langs, ids=ids,
            tgt_dict=tgt_dict, pre_tokenizer=pre_tokenizer, bpe_tokenizer=bpe_tokenizer,
        )
        if self.dataset_transforms.transforms:
            raise ValueError("config.yaml: dataset transforms (concat/noisy-overlap augment) are not supported here")
        # sizes used for filtering and batching count the prefix and </s>
        self.tgt_lens = [n + PREFIX_LEN + 1 for n in self.tgt_lens]

    def __repr__(self):
        counts = {}
        for t, b in zip(self.tasks, self.bandwidths):
            counts[f"{t}/{b}"] = counts.get(f"{t}/{b}", 0) + 1
        return f"{self.__class__.__name__}(split={self.split!r}, n_samples={self.n_samples:_}, task/bandwidth={counts})"

    # ---------------------------------------------------------------- source
    def _get_source_audio(self, index) -> torch.Tensor:
        if not isinstance(index, (int, np.integer)):
            raise ValueError("concatenated sources (ConcatAugment) are not supported")
        ref = audio.resolve(self.audio_paths[index], self.audio_root)
        if Path(ref.path).suffix.lower() == ".npy" or (ref.is_slice and _slice_is_npy(ref)):
            feats = audio.read_features(ref)
        else:
            wav, sr = audio.read_waveform(ref)
            feats = audio.fbank(audio.resample(wav, sr), self.cfg.input_feat_per_channel)
            if feats.shape[0] == 0:
                raise audio.AudioError(f"{ref}: shorter than one 25 ms analysis window")
        if feats.shape[1] != self.cfg.input_feat_per_channel:
            raise audio.AudioError(
                f"{ref}: {feats.shape[1]}-dim features, config.yaml says input_feat_per_channel="
                f"{self.cfg.input_feat_per_channel}"
            )
        if self.feature_transforms is not None:
            feats = self.feature_transforms(feats)
        return torch.from_numpy(np.ascontiguousarray(feats)).float()

    def __getitem__(self, index: int) -> SMoEDatasetItem:
        source = self._get_source_audio(index)
        text = self.get_tokenized_tgt_text(index)
        tokens = self.tgt_dict.encode_line(text, add_if_not_exist=False, append_eos=True).long()
        prefix = self.prefixes[index]
        return SMoEDatasetItem(
            index=index,
            source=source,
            target=torch.cat([prefix, tokens]),
            speaker_id=None,
            encoder_route=int(self.encoder_routes[index]),
            decoder_route=int(self.decoder_routes[index]),
            prefix=prefix,
        )

    # ---------------------------------------------------------------- batch
    def collater(self, samples: List[SMoEDatasetItem], return_order: bool = False) -> Dict:
        if len(samples) == 0:
            return {}
        out = super().collater(samples, return_order=True)
        order = out["order"] if return_order else out.pop("order")
        pad = self.tgt_dict.pad()
        # the guiding prefix is decoder input only: mask it out of what criteria score
        out["target"][:, :PREFIX_LEN] = pad
        out["target_lengths"] = out["target_lengths"] - PREFIX_LEN
        out["ntokens"] = int(out["target_lengths"].sum())
        enc = torch.tensor([s.encoder_route for s in samples], dtype=torch.long).index_select(0, order)
        dec = torch.tensor([s.decoder_route for s in samples], dtype=torch.long).index_select(0, order)
        out["net_input"]["encoder_route_ids"] = enc
        out["net_input"]["decoder_route_ids"] = dec
        out["decoder_prefix"] = torch.stack([s.prefix for s in samples]).index_select(0, order)
        out["tasks"] = [self.tasks[int(i)] for i in out["id"]]
        return out

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        """Batches of one (bandwidth, task) route pair each, unless ``smoe.homogeneous_batches: false``.

        fairseq's epoch iterator shuffles the list of batches, so the single-route batches come interleaved.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if not self.smoe_cfg.homogeneous_batches:
            groups = [indices]
        else:
            keys = self.encoder_routes[indices] * 1000 + self.decoder_routes[indices]
            groups = [indices[keys == key] for key in np.unique(keys)]  # each keeps the length order
        batches = []
        for group in groups:
            group_batches = super().batch_by_size(group, max_tokens, max_sentences, required_batch_size_multiple)
            done = sum(len(b) for b in group_batches)
            if done < len(group):
                # fairseq drops a last batch whose size is not a multiple of --required-batch-size-multiple;
                # with one group per route pair that would lose data in every group: keep it
                group_batches += super().batch_by_size(group[done:], max_tokens, max_sentences, 1)
            batches.extend(group_batches)
        covered = sum(len(b) for b in batches)
        if covered != len(indices):
            raise RuntimeError(f"{self.split}: batching covered {covered} of {len(indices)} samples")
        return batches

    def route_pair(self, index: int):
        return int(self.encoder_routes[index]), int(self.decoder_routes[index])


def _slice_is_npy(ref: audio.AudioRef) -> bool:
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        return f.read(6) == b"\x93NUMPY"


def derive_bandwidth(ref: audio.AudioRef, smoe_cfg: SMoEDataConfig) -> str:
    """The bandwidth label of one file that the manifest leaves blank (see ``smoe.bandwidth_detection``)."""
    sr = audio.sample_rate_of(ref)
    if sr is None:
        raise audio.AudioError(f"{ref}: feature files carry no sample rate; give the row a bandwidth (nb/wb)")
    if smoe_cfg.bandwidth_detection == "rate" or sr < audio.TARGET_SAMPLE_RATE:
        return audio.bandwidth_from_rate(sr)
    wav, sr = audio.read_waveform(ref)
    return audio.spectral_bandwidth(audio.resample(wav, sr), audio.TARGET_SAMPLE_RATE, smoe_cfg.spectral_threshold_db)


class SMoEDatasetCreator:
    """Builds :class:`SMoESpeechToTextDataset` from one or more manifests (``train_asr,train_st``: rows merged)."""

    @classmethod
    def from_tsv(
        cls,
        root: str,
        cfg: S2TDataConfig,
        smoe_cfg: SMoEDataConfig,
        splits: str,
        tgt_dict: Dictionary,
        pre_tokenizer,
        bpe_tokenizer,
        is_train_split: bool,
        force_task: Optional[str] = None,
        force_tgt_lang: Optional[str] = None,
    ) -> SMoESpeechToTextDataset:
        table = smoe_cfg.routing_table
        cols: Dict[str, list] = {k: [] for k in (
            "ids", "audio_paths", "n_frames", "tgt_texts", "speakers", "src_langs", "tgt_langs", "tasks",
            "bandwidths", "encoder_routes", "decoder_routes", "prefixes")}
        seen_ids: Dict[str, str] = {}
        audio_root = cfg.audio_root or None
        if audio_root and not os.path.isabs(audio_root):
            audio_root = os.path.join(root, audio_root)
        n_derived = 0
        for split in splits.split(","):
            path = os.path.join(root, f"{split}.tsv")
            rows = read_manifest(path)
            base = audio_root or os.path.dirname(os.path.abspath(path))
            for line, row in enumerate(rows, start=2):
                where = f"{path}:{line} (id {row['id']!r})"
                if row["id"] in seen_ids:
                    raise ManifestError(f"{where}: duplicate id, first seen at {seen_ids[row['id']]}")
                seen_ids[row["id"]] = where
                try:
                    n = int(row["n_frames"])
                except ValueError:
                    raise ManifestError(f"{where}: n_frames {row['n_frames']!r} is not an integer") from None
                if n <= 0:
                    raise ManifestError(f"{where}: n_frames must be positive, got {n}")
                if not row["tgt_text"].strip():
                    raise ManifestError(f"{where}: empty tgt_text")
                task = force_task or row["task"]
                if task not in TASK_TO_GUIDING_TOKEN:
                    raise ManifestError(f"{where}: unknown task {task!r}; expected one of {list(TASK_TO_GUIDING_TOKEN)}")
                tgt_lang = force_tgt_lang or row["tgt_lang"]
                if not tgt_lang:
                    raise ManifestError(f"{where}: empty tgt_lang")
                token = TASK_TO_GUIDING_TOKEN[task]
                try:
                    dec_route = table.decoder_route_id(token, tgt_lang)
                except KeyError as e:
                    raise ManifestError(f"{where}: {e.args[0]}") from None
                prefix = []
                for sym in (guiding_token(token), lang_tag(tgt_lang)):
                    idx = tgt_dict.index(sym)
                    if idx == tgt_dict.unk():
                        raise ManifestError(
                            f"{where}: guiding token {sym} is not in the dictionary; rebuild the vocabulary with "
                            f"fairseq_smoe.vocab (it adds <transcribe>, <translate> and a <lang:xx> per language)"
                        )
                    prefix.append(idx)
                bandwidth = (row.get("bandwidth") or "").strip()
                if not bandwidth:
                    try:
                        bandwidth = derive_bandwidth(audio.resolve(row["audio"], base), smoe_cfg)
                    except audio.AudioError as e:
                        raise ManifestError(f"{where}: {e}") from None
                    n_derived += 1
                    if n_derived % 1000 == 0:
                        logger.info(f"derived bandwidth of {n_derived} files ...")
                try:
                    enc_route = table.encoder_route_id(bandwidth)
                except KeyError as e:
                    raise ManifestError(f"{where}: {e.args[0]}") from None
                cols["ids"].append(row["id"])
                cols["audio_paths"].append(row["audio"])
                cols["n_frames"].append(n)
                cols["tgt_texts"].append(row["tgt_text"])
                cols["speakers"].append(row.get("speaker", ""))
                cols["src_langs"].append(row.get("src_lang", ""))
                cols["tgt_langs"].append(tgt_lang)
                cols["tasks"].append(task)
                cols["bandwidths"].append(bandwidth)
                cols["encoder_routes"].append(enc_route)
                cols["decoder_routes"].append(dec_route)
                cols["prefixes"].append(prefix)
            if n_derived:
                logger.info(f"{path}: bandwidth derived from audio ({smoe_cfg.bandwidth_detection}) for {n_derived} rows")
        # audio paths are resolved per manifest; keep them absolute so one dataset can mix manifests
        return SMoESpeechToTextDataset(
            split=splits, is_train_split=is_train_split, cfg=cfg, smoe_cfg=smoe_cfg,
            tgt_dict=tgt_dict, pre_tokenizer=pre_tokenizer, bpe_tokenizer=bpe_tokenizer,
            audio_root=None, **_absolute_audio(cols, root, audio_root, splits),
        )


def _absolute_audio(cols: Dict[str, list], root: str, audio_root: Optional[str], splits: str) -> Dict[str, list]:
    """Rewrite relative ``audio`` fields against ``audio_root`` or their manifest's folder (all under ``root``)."""
    base = audio_root or os.path.abspath(root)
    fixed = []
    for a in cols["audio_paths"]:
        ref_path = a if os.path.isabs(a) else os.path.join(base, a)
        fixed.append(ref_path)
    cols = dict(cols)
    cols["audio_paths"] = fixed
    return cols
