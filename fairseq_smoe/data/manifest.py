"""The manifest: which columns a row has, how a manifest TSV is read, and how each row is checked.

A manifest is fairseq's S2T TSV plus the two S-MoE columns a row's routes come from::

    id  audio  n_frames  tgt_text  speaker  task  src_lang  tgt_lang  bandwidth

``task`` names the decoder route (through its guiding token, see :mod:`fairseq_smoe.routing`); ``bandwidth``
(``wb``/``nb``) names the encoder route and may be left blank, it is then derived from the audio. The column lists
live here only: the dataset reads them, every prep pipeline writes :data:`MANIFEST_COLUMNS`, and the dense export
writes :data:`STOCK_MANIFEST_COLUMNS` (what stock ``speech_to_text`` reads).
"""

import csv
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from fairseq.data import Dictionary

from . import audio
from .config import SMoEDataConfig

logger = logging.getLogger(__name__)

# fairseq's own S2T manifest columns (stock ``speech_to_text`` reads exactly these)
STOCK_MANIFEST_COLUMNS = ["id", "audio", "n_frames", "tgt_text", "speaker", "src_lang", "tgt_lang"]
# what every prep pipeline writes, in this order
MANIFEST_COLUMNS = ["id", "audio", "n_frames", "tgt_text", "speaker", "task", "src_lang", "tgt_lang", "bandwidth"]
# what the dataset needs in a header; the optional ones may be missing or blank
REQUIRED_COLUMNS = ("id", "audio", "n_frames", "tgt_text", "task", "tgt_lang")
OPTIONAL_COLUMNS = ("speaker", "src_lang", "src_text", "bandwidth")


class ManifestError(ValueError):
    """A manifest problem; the message names the file and row."""


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


def derive_bandwidth(ref: audio.AudioRef, smoe_cfg: SMoEDataConfig) -> str:
    """The bandwidth label of one file that the manifest leaves blank (see ``smoe.bandwidth_detection``)."""
    sr = audio.sample_rate_of(ref)
    if sr is None:
        raise audio.AudioError(f"{ref}: feature files carry no sample rate; give the row a bandwidth (nb/wb)")
    if smoe_cfg.bandwidth_detection == "rate" or sr < audio.TARGET_SAMPLE_RATE:
        return audio.bandwidth_from_rate(sr)  # no need to read the samples
    return waveform_bandwidth(*audio.read_waveform(ref), smoe_cfg)


def waveform_bandwidth(wav, sr: int, smoe_cfg: SMoEDataConfig) -> str:
    """The bandwidth label of audio by ``smoe.bandwidth_detection`` (the rate; spectral at 16 kHz and above).

    One rule for manifest rows without a label and for audio given to the hub interface."""
    if smoe_cfg.bandwidth_detection == "rate" or sr < audio.TARGET_SAMPLE_RATE:
        return audio.bandwidth_from_rate(sr)
    return audio.spectral_bandwidth(audio.resample(wav, sr), audio.TARGET_SAMPLE_RATE, smoe_cfg.spectral_threshold_db)


@dataclass
class ParsedRow:
    id: str
    audio: str  # absolute path or zip slice
    n_frames: int
    tgt_text: str
    speaker: str
    src_lang: str
    tgt_lang: str
    task: str
    bandwidth: str
    encoder_route: int
    decoder_route: int
    prefix: List[int]


class RowChecker:
    """Turns manifest rows into :class:`ParsedRow` s, or into the list of everything wrong with them.

    Shared by the dataset (which stops at the first bad row) and ``python -m fairseq_smoe.cli.validate`` (which lists
    every problem of every row in one pass).
    """

    def __init__(self, smoe_cfg: SMoEDataConfig, tgt_dict: Optional[Dictionary], force_task=None, force_tgt_lang=None):
        self.smoe_cfg = smoe_cfg
        self.table = smoe_cfg.routing_table
        self.tgt_dict = tgt_dict
        self.force_task = force_task
        self.force_tgt_lang = force_tgt_lang
        self.seen_ids: Dict[str, str] = {}
        self.n_derived = 0

    def check(self, row: Dict[str, str], where: str, base: str, check_audio: bool = False):
        """``(ParsedRow, [])`` for a good row, ``(None, problems)`` otherwise."""
        problems: List[str] = []
        if row["id"] in self.seen_ids:
            problems.append(f"duplicate id, first seen at {self.seen_ids[row['id']]}")
        else:
            self.seen_ids[row["id"]] = where
        n = None
        try:
            n = int(row["n_frames"])
            if n <= 0:
                problems.append(f"n_frames must be positive, got {n}")
        except ValueError:
            problems.append(f"n_frames {row['n_frames']!r} is not an integer")
        if not row["tgt_text"].strip():
            problems.append("empty tgt_text")
        task = self.force_task or row["task"]
        tgt_lang = self.force_tgt_lang or row["tgt_lang"]
        dec_route, prefix = None, []
        if task not in self.table.tasks:
            problems.append(f"unknown task {task!r}; expected one of {list(self.table.tasks)} (config.yaml smoe.tasks)")
        elif not tgt_lang:
            problems.append("empty tgt_lang")
        else:
            try:
                dec_route = self.table.decoder_route_of_task(task, tgt_lang)
            except KeyError as e:
                problems.append(e.args[0])
            if self.tgt_dict is not None:
                for sym in self.table.prefix_symbols(task, tgt_lang):
                    idx = self.tgt_dict.index(sym)
                    if idx == self.tgt_dict.unk():
                        problems.append(
                            f"guiding token {sym} is not in the dictionary; rebuild the vocabulary with "
                            f"fairseq_smoe.data.vocab (it adds the guiding token of every decoder route and a "
                            f"<lang:xx> per language)"
                        )
                    prefix.append(idx)
        try:
            ref = audio.resolve(row["audio"], base)
        except audio.AudioError as e:
            ref = None
            problems.append(str(e))
        bandwidth = (row.get("bandwidth") or "").strip()
        if ref is not None:
            try:
                if not bandwidth:
                    bandwidth = derive_bandwidth(ref, self.smoe_cfg)
                    self.n_derived += 1
                    if self.n_derived % 1000 == 0:
                        logger.info(f"derived the bandwidth of {self.n_derived} files ...")
                elif check_audio or not ref.is_slice:
                    if not os.path.isfile(ref.path):
                        raise audio.AudioError(f"{ref}: file not found")
                if check_audio:
                    frames = audio.check_source(ref)
                    if n is not None and n > 0:
                        audio.check_frames(ref, frames, n)
            except audio.AudioError as e:
                problems.append(str(e))
        enc_route = None
        if bandwidth:
            try:
                enc_route = self.table.encoder_route_id(bandwidth)
            except KeyError as e:
                problems.append(e.args[0])
        if problems:
            return None, problems
        return ParsedRow(
            id=row["id"], audio=str(ref), n_frames=n, tgt_text=row["tgt_text"], speaker=row.get("speaker", ""),
            src_lang=row.get("src_lang", ""), tgt_lang=tgt_lang, task=task, bandwidth=bandwidth,
            encoder_route=enc_route, decoder_route=dec_route, prefix=prefix,
        ), []


def manifest_base(root: str, cfg_audio_root: Optional[str], manifest_path: str) -> str:
    """Relative ``audio`` fields resolve against ``audio_root`` (itself relative to the data dir) or the manifest's folder."""
    if cfg_audio_root:
        return cfg_audio_root if os.path.isabs(cfg_audio_root) else os.path.join(root, cfg_audio_root)
    return os.path.dirname(os.path.abspath(manifest_path))
