"""Bandwidth-aware speech-to-text dataset: manifest rows -> fbank + guided target + encoder/decoder route ids.

Manifest columns, reading and row checks: :mod:`fairseq_smoe.data.manifest`. Targets become ``<transcribe> <lang:en>
... </s>`` (ASR) or ``<translate> <lang:es> ... </s>`` (ST): the guiding prefix
(:meth:`fairseq_smoe.routing.RoutingTable.prefix_symbols`, ``PREFIX_LEN`` tokens) is fed to the decoder but masked
(pad) in ``target``, so no criterion scores it; generation forces it from ``decoder_prefix``, which comes from the
manifest (or a command-line override), never from the reference.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from fairseq.data import Dictionary, data_utils
from fairseq.data.audio.data_cfg import S2TDataConfig
from fairseq.data.audio.speech_to_text_dataset import SpeechToTextDataset, SpeechToTextDatasetItem

from . import audio
from .config import SMoEDataConfig
from .manifest import ManifestError, ParsedRow, RowChecker, derive_bandwidth, manifest_base, read_manifest  # noqa: F401
from ..routing import PREFIX_LEN, RoutePlan

logger = logging.getLogger(__name__)

@dataclass
class SMoEDatasetItem(SpeechToTextDatasetItem):
    encoder_route: int = 0
    decoder_route: int = 0
    prefix: Optional[torch.Tensor] = None


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
        manifest_paths: Sequence[str] = (),
        row_manifests: Optional[List[int]] = None,
        row_lines: Optional[List[int]] = None,
        seed: int = 1,
        skip_bad_samples: bool = False,
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
        self.routing_table = smoe_cfg.routing_table
        self.audio_root = audio_root
        self.tasks = tasks
        self.bandwidths = bandwidths
        self.encoder_routes = np.asarray(encoder_routes, dtype=np.int64)
        self.decoder_routes = np.asarray(decoder_routes, dtype=np.int64)
        self.prefixes = torch.tensor(prefixes, dtype=torch.long)
        # where each row came from (manifest, line), kept compact for corpora of millions of rows
        self.manifest_paths = list(manifest_paths)
        self.row_manifests = None if row_manifests is None else np.asarray(row_manifests, dtype=np.int32)
        self.row_lines = None if row_lines is None else np.asarray(row_lines, dtype=np.int64)
        self.seed = seed
        self.epoch = 1
        self.skip_bad_samples = skip_bad_samples
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
    def where(self, index: int) -> str:
        """``manifest.tsv:LINE (id 'x')`` of a sample, for error messages."""
        if self.row_manifests is None:
            return f"{self.split} (id {self.ids[index]!r})"
        return f"{self.manifest_paths[self.row_manifests[index]]}:{self.row_lines[index]} (id {self.ids[index]!r})"

    def set_epoch(self, epoch):
        self.epoch = epoch

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
                raise audio.AudioError(f"{ref}: {len(wav) / sr * 1000:.1f} ms, shorter than one 25 ms analysis window")
        audio.check_frames(ref, feats.shape[0], self.n_frames[index])
        if feats.shape[1] != self.cfg.input_feat_per_channel:
            raise audio.AudioError(
                f"{ref}: {feats.shape[1]}-dim features, config.yaml says input_feat_per_channel="
                f"{self.cfg.input_feat_per_channel}"
            )
        if self.feature_transforms is not None:
            # SpecAugment draws from numpy's global RNG: seed it per (epoch, sample) so that a resumed run, any
            # number of data-loader workers and any number of GPUs see the same augmentation
            with data_utils.numpy_seed(self.seed, self.epoch, int(index)):
                feats = self.feature_transforms(feats)
        return torch.from_numpy(np.ascontiguousarray(feats)).float()

    def __getitem__(self, index: int) -> Optional[SMoEDatasetItem]:
        try:
            source = self._get_source_audio(index)
        except audio.AudioError as e:
            if not self.skip_bad_samples:
                raise audio.AudioError(
                    f"{self.where(index)}: {e} (--skip-bad-samples skips and counts such samples)"
                ) from None
            logger.warning(f"skipped {self.where(index)}: {e}")
            return None
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
    def collater(self, samples: List[Optional[SMoEDatasetItem]], return_order: bool = False) -> Dict:
        n_skipped = sum(s is None for s in samples)  # unreadable audio under --skip-bad-samples
        samples = [s for s in samples if s is not None]
        if len(samples) == 0:
            return {}  # fairseq treats an empty dict as a batch to skip
        out = super().collater(samples, return_order=True)
        out["n_skipped"] = n_skipped
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
        # the same ids on the host, for the model to group its rows without reading ids back from the device
        # (and which rows are ASR rows, for the criteria, joint CTC decoding and scoring)
        out["net_input"]["route_plan"] = RoutePlan(enc.numpy(), dec.numpy(), self.routing_table.asr_rows(dec.numpy()))
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
            keys = self.routing_table.batch_keys(self.encoder_routes[indices], self.decoder_routes[indices])
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


def _slice_is_npy(ref: audio.AudioRef) -> bool:
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        return f.read(6) == b"\x93NUMPY"


class SMoEDatasetCreator:
    """Builds :class:`SMoESpeechToTextDataset` from one or more manifests (``train_asr,train_st``: rows merged)."""

    # bad rows listed in the log when --skip-bad-samples skips them (the validate command lists them all)
    MAX_LOGGED_PROBLEMS = 20

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
        seed: int = 1,
        skip_bad_samples: bool = False,
    ) -> SMoESpeechToTextDataset:
        checker = RowChecker(smoe_cfg, tgt_dict, force_task, force_tgt_lang)
        parsed: List[ParsedRow] = []
        manifest_paths: List[str] = []
        row_manifests: List[int] = []
        row_lines: List[int] = []
        for split in splits.split(","):
            path = os.path.join(root, f"{split}.tsv")
            base = manifest_base(root, cfg.audio_root or None, path)
            n_derived = checker.n_derived
            manifest_paths.append(path)
            n_rows = n_bad = 0
            for line, row in enumerate(read_manifest(path), start=2):
                n_rows += 1
                where = f"{path}:{line} (id {row['id']!r})"
                item, problems = checker.check(row, where, base)
                if problems:
                    message = f"{where}: " + "; ".join(problems)
                    if not skip_bad_samples:
                        raise ManifestError(
                            message + f" (python -m fairseq_smoe.cli.validate {path} lists every problem; "
                            f"--skip-bad-samples skips bad rows)"
                        )
                    n_bad += 1
                    if n_bad <= cls.MAX_LOGGED_PROBLEMS:
                        logger.warning(f"skipped {message}")
                    continue
                parsed.append(item)
                row_manifests.append(len(manifest_paths) - 1)
                row_lines.append(line)
            if n_bad:
                logger.warning(
                    f"{path}: skipped {n_bad} of {n_rows} rows (--skip-bad-samples); "
                    f"`python -m fairseq_smoe.cli.validate {path}` lists every problem"
                )
            if checker.n_derived > n_derived:
                logger.info(f"{path}: bandwidth derived from audio ({smoe_cfg.bandwidth_detection}) "
                            f"for {checker.n_derived - n_derived} rows")
        if not parsed:
            raise ManifestError(f"{splits}: no usable rows in {manifest_paths}")
        return SMoESpeechToTextDataset(
            split=splits, is_train_split=is_train_split, cfg=cfg, smoe_cfg=smoe_cfg,
            tgt_dict=tgt_dict, pre_tokenizer=pre_tokenizer, bpe_tokenizer=bpe_tokenizer, audio_root=None,
            ids=[r.id for r in parsed], audio_paths=[r.audio for r in parsed], n_frames=[r.n_frames for r in parsed],
            tgt_texts=[r.tgt_text for r in parsed], speakers=[r.speaker for r in parsed],
            src_langs=[r.src_lang for r in parsed], tgt_langs=[r.tgt_lang for r in parsed],
            tasks=[r.task for r in parsed], bandwidths=[r.bandwidth for r in parsed],
            encoder_routes=[r.encoder_route for r in parsed], decoder_routes=[r.decoder_route for r in parsed],
            prefixes=[r.prefix for r in parsed], manifest_paths=manifest_paths, row_manifests=row_manifests,
            row_lines=row_lines, seed=seed, skip_bad_samples=skip_bad_samples,
        )
