"""What every public-corpus recipe shares: a corpus reader turns its files into :class:`Utterance` s, and
:func:`prepare` turns those into an S-MoE data directory (its rows, vocabulary and config go through
:func:`.common.write_data_dir`, the writer the offline corpus uses too).

    audio/<split>/<bw>/<group>/<id>.wav   segment cuts, decoded mp3s, telephone-band copies (``--audio-format flac``:
                                          .flac); written atomically, skipped on rerun
    <split>.tsv                           every row of a split (train on ``train``, validate on ``dev``)
    <split>_<task>_<lang>_<bw>.tsv        one task, target language and bandwidth (test sets: WER/BLEU per column)
    spm.model, spm.txt, config.yaml       SentencePiece with the guiding tokens, fairseq's S2T config
    prep.json                             row counts and hours per manifest

Audio the plugin reads as it is (mono ``.wav``/``.flac``/``.ogg`` at 8-48 kHz, whole files) is referenced in place
by absolute path, never copied. Everything else is written as 16-bit audio: segments cut out of long recordings
(MuST-C talks), compressed formats the plugin does not read (Common Voice mp3), and the NB copies of WB audio
(300-3400 Hz, 8 kHz, G.711 mu-law; :func:`fairseq_smoe.data.audio.telephone_channel`). Audio, not fbank features, is
stored because the plugin computes features on the fly: the encoder is routed by the audio's bandwidth, and the
``spectral`` bandwidth detection and any feature setting keep working. WB audio above 16 kHz is written at 16 kHz,
the rate features are computed at: nothing is lost, and a 48 kHz source takes a third of the disk.
"""

import argparse
import json
import logging
import multiprocessing
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data import audio
from ..routing import (ASR_TASK, BANDWIDTHS, DEFAULT_DECODER_ROUTES, DEFAULT_ENCODER_ROUTES, NB, ST_TASK, WB,
                       RoutingTable)
from .common import (
    PrepError,
    atomic_path,
    clean_text,
    manifest_row,
    n_frames_of,
    parallel_map,
    remove_stale_tmp,
    setup_logging,
    write_audio,
    write_data_dir,
)

logger = logging.getLogger(__name__)

TASKS = (ASR_TASK, ST_TASK)
# a segment may run this far past the end of its recording (real corpora's timings are rounded) before it is an error
SEGMENT_OVERRUN_S = 1.0

@dataclass
class Utterance:
    """One recording (or one segment of a recording) with its texts, as a corpus lists it."""

    id: str
    split: str
    source: str  # audio file
    where: str  # where the corpus lists it, for error messages ("train.yaml entry 17")
    speaker: str = ""
    src_lang: str = "en"
    transcript: Optional[str] = None
    translations: Dict[str, str] = field(default_factory=dict)  # target language -> text
    offset: Optional[float] = None  # seconds into ``source`` (segments of long recordings)
    duration: Optional[float] = None
    group: str = ""  # sub-folder for written audio (talk, speaker), keeps folders small
    bandwidth: Optional[str] = None  # nb/wb when the corpus says; else from the sample rate


@dataclass
class Options:
    out_dir: Path
    bandwidths: Tuple[str, ...] = BANDWIDTHS
    tasks: Tuple[str, ...] = TASKS
    vocab_size: int = 8000
    vocab_type: str = "unigram"
    byte_fallback: bool = False
    audio_format: str = "wav"
    max_train_seconds: float = 30.0
    min_train_frames: int = 5
    workers: Optional[int] = None
    specaugment: bool = True
    decoder_routes: Tuple[str, ...] = DEFAULT_DECODER_ROUTES


# ---------------------------------------------------------------------------------------------------------------
# audio


@dataclass
class AudioJob:
    utt: Utterance
    out_dir: str
    bandwidths: Tuple[str, ...]
    audio_format: str

    def __repr__(self):  # parallel_map names the failing item with this
        return f"{self.utt.id} ({self.utt.where})"


def _info(utt: Utterance):
    import soundfile as sf

    if not os.path.isfile(utt.source):
        raise PrepError(f"{utt.where}: audio file {utt.source} not found")
    try:
        return sf.info(utt.source)
    except Exception as e:
        raise PrepError(f"{utt.where}: cannot read {utt.source} ({e}); soundfile >= 0.12 (libsndfile >= 1.1) "
                        f"reads wav, flac, ogg and mp3") from None


def read_source(utt: Utterance, info) -> Tuple[np.ndarray, int]:
    """The utterance's samples (mono, float32): the whole file, or ``offset``/``duration`` seconds of it."""
    import soundfile as sf

    sr = int(info.samplerate)
    start, frames = 0, -1
    if utt.offset is not None:
        start = int(round(utt.offset * sr))
        frames = int(round(utt.duration * sr))
        if start >= info.frames:
            raise PrepError(f"{utt.where}: offset {utt.offset:.3f}s is past the end of {utt.source} "
                            f"({info.frames / sr:.3f}s)")
        if start + frames > info.frames + SEGMENT_OVERRUN_S * sr:
            raise PrepError(f"{utt.where}: segment {utt.offset:.3f}s + {utt.duration:.3f}s runs past the end of "
                            f"{utt.source} ({info.frames / sr:.3f}s)")
        frames = min(frames, info.frames - start)
    try:
        wav, sr = sf.read(utt.source, start=start, frames=frames, dtype="float32", always_2d=True)
    except Exception as e:
        raise PrepError(f"{utt.where}: cannot decode {utt.source} ({e})") from None
    if wav.shape[0] == 0:
        raise PrepError(f"{utt.where}: {utt.source} has no samples")
    return wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0], int(sr)


def source_bandwidth(utt: Utterance, sr: int) -> str:
    return utt.bandwidth or audio.bandwidth_from_rate(sr)


def _frames_on_disk(path: Path) -> Tuple[int, int]:
    import soundfile as sf

    info = sf.info(str(path))
    return info.frames, int(info.samplerate)


def prepare_audio(job: AudioJob) -> Dict[str, Tuple[str, int]]:
    """Write what ``job`` needs that is not there yet; returns ``{bandwidth: (manifest audio field, n_frames)}``.

    A WB source gives ``wb`` (in place or written) and, if asked, an ``nb`` telephone copy; an NB source gives
    ``nb`` only (wideband cannot be made from narrowband).
    """
    if multiprocessing.current_process().name != "MainProcess":
        import torch

        torch.set_num_threads(1)  # one utterance per core; intra-op threads would only contend
    utt, out_dir = job.utt, Path(job.out_dir)
    info = _info(utt)
    sr = int(info.samplerate)
    src_bw = source_bandwidth(utt, sr)
    if src_bw not in BANDWIDTHS:
        raise PrepError(f"{utt.where}: bandwidth {src_bw!r} is not one of {BANDWIDTHS}")
    in_place = (utt.offset is None and Path(utt.source).suffix.lower() in audio.AUDIO_EXTENSIONS
                and info.channels == 1 and audio.SUPPORTED_RATES[0] <= sr <= audio.SUPPORTED_RATES[1])
    decoded: List[Tuple[np.ndarray, int]] = []

    def samples() -> Tuple[np.ndarray, int]:
        if not decoded:
            decoded.append(read_source(utt, info))
        return decoded[0]

    out: Dict[str, Tuple[str, int]] = {}
    for bw in job.bandwidths:
        if bw != src_bw and not (bw == NB and src_bw == WB):
            continue
        if bw == src_bw and in_place:
            out[bw] = (str(Path(utt.source).resolve()), n_frames_of(info.frames, sr))
            continue
        rel = Path("audio", utt.split, bw, utt.group, f"{utt.id}.{job.audio_format}")
        path = out_dir / rel
        if not path.exists():
            wav, wav_sr = samples()
            if bw != src_bw:  # telephone-band copy of WB audio
                wav, wav_sr = audio.telephone_channel(wav, wav_sr), 8000
            elif wav_sr > audio.TARGET_SAMPLE_RATE:  # features are computed at 16 kHz; keep no more
                wav, wav_sr = audio.resample(wav, wav_sr), audio.TARGET_SAMPLE_RATE
            write_audio(path, np.clip(wav, -1.0, 1.0), wav_sr)
        n, rate = _frames_on_disk(path)
        out[bw] = (rel.as_posix(), n_frames_of(n, rate))
    return out


# ---------------------------------------------------------------------------------------------------------------
# manifests, vocabulary, config


def check_utterances(utts: Sequence[Utterance]) -> None:
    seen: Dict[str, str] = {}
    for u in utts:
        if u.id in seen:
            raise PrepError(f"{u.where}: utterance id {u.id!r} already used by {seen[u.id]}")
        seen[u.id] = u.where
        if not re.fullmatch(r"[\w.\-]+", u.id):
            raise PrepError(f"{u.where}: utterance id {u.id!r} may only hold letters, digits, '_', '-' and '.'")
        if u.offset is not None and (u.duration is None or u.duration <= 0 or u.offset < 0):
            raise PrepError(f"{u.where}: segment needs offset >= 0 and duration > 0, got {u.offset}, {u.duration}")


def targets(utt: Utterance, tasks: Sequence[str]) -> List[Tuple[str, str, str]]:
    """``(task, tgt_lang, text)`` for every target of ``utt`` the recipe was asked for."""
    out = []
    if ASR_TASK in tasks and utt.transcript is not None:
        out.append((ASR_TASK, utt.src_lang, clean_text(utt.transcript)))
    if ST_TASK in tasks:
        out += [(ST_TASK, lang, clean_text(text)) for lang, text in sorted(utt.translations.items())]
    return out


def manifest_rows(utts: Sequence[Utterance], audio_out: Sequence[Dict[str, Tuple[str, int]]], opts: Options):
    """Rows per split; rows that cannot train are dropped and counted by reason (fairseq's filter_manifest_df)."""
    rows: Dict[str, List[dict]] = defaultdict(list)
    dropped: Counter = Counter()
    max_frames = int(opts.max_train_seconds * 100)
    for utt, outs in zip(utts, audio_out):
        is_train = utt.split.startswith("train")
        for bw in opts.bandwidths:
            if bw not in outs:
                continue
            field_, n_frames = outs[bw]
            if n_frames == 0:
                dropped["shorter than one 25 ms frame"] += 1
                continue
            if is_train and n_frames < opts.min_train_frames:
                dropped[f"train, shorter than {opts.min_train_frames} frames"] += 1
                continue
            if is_train and n_frames > max_frames:
                dropped[f"train, longer than {opts.max_train_seconds:g} s"] += 1
                continue
            for task, lang, text in targets(utt, opts.tasks):
                if not text:
                    dropped["empty text"] += 1
                    continue
                rows[utt.split].append(manifest_row(
                    id=f"{utt.id}_{task}_{lang}_{bw}", audio=field_, n_frames=n_frames, tgt_text=text,
                    speaker=utt.speaker, task=task, src_lang=utt.src_lang, tgt_lang=lang, bandwidth=bw))
    for reason, n in sorted(dropped.items()):
        logger.warning(f"dropped {n} row(s): {reason}")
    return rows, dropped


def vocab_texts(utts: Sequence[Utterance], tasks: Sequence[str]) -> List[str]:
    """Target texts of the train splits (once per utterance, not per bandwidth); all splits if there is no train."""
    train = [u for u in utts if u.split.startswith("train")]
    if not train:
        logger.warning("no train split: the vocabulary is trained on every split's text")
        train = list(utts)
    return [text for u in train for _, _, text in targets(u, tasks) if text]


def routing_table(utts: Sequence[Utterance], opts: Options) -> RoutingTable:
    """The config's routes; every (task, target language) of the corpus must have a decoder expert."""
    try:
        table = RoutingTable(DEFAULT_ENCODER_ROUTES, opts.decoder_routes)
        for u in utts:
            for task, lang, _ in targets(u, opts.tasks):
                table.decoder_route_of_task(task, lang)
    except (KeyError, ValueError) as e:
        raise PrepError(f"--decoder-routes {','.join(opts.decoder_routes)}: {e.args[0]}") from None
    return table


def prepare(utts: Sequence[Utterance], opts: Options) -> dict:
    """Audio, manifests, vocabulary and config.yaml for ``utts`` in ``opts.out_dir``; returns the summary."""
    if not utts:
        raise PrepError("no utterances found; check the corpus path and --splits")
    check_utterances(utts)
    table = routing_table(utts, opts)
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_tmp(out_dir)
    if stale:
        logger.info(f"removed {stale} temporary file(s) of an interrupted run")
    logger.info(f"{len(utts)} utterances in splits {sorted({u.split for u in utts})}; bandwidths "
                f"{','.join(opts.bandwidths)}; tasks {','.join(opts.tasks)}")

    jobs = [AudioJob(u, str(out_dir), tuple(opts.bandwidths), opts.audio_format) for u in utts]
    audio_out = parallel_map(prepare_audio, jobs, "audio", workers=opts.workers)
    rows, dropped = manifest_rows(utts, audio_out, opts)
    if not rows:
        raise PrepError(f"no manifest rows: the utterances have no targets for tasks {opts.tasks} "
                        f"and bandwidths {opts.bandwidths}")

    langs = sorted({r["tgt_lang"] for split_rows in rows.values() for r in split_rows})
    # every split, then its one-task, one-language, one-bandwidth slices
    manifests: Dict[str, List[dict]] = {}
    for split, split_rows in sorted(rows.items()):
        slices: Dict[str, List[dict]] = defaultdict(list)
        for r in split_rows:
            slices[f"{split}_{r['task']}_{r['tgt_lang']}_{r['bandwidth']}"].append(r)
        manifests.update([(split, split_rows)] + sorted(slices.items()))
    write_data_dir(out_dir, manifests, vocab_texts(utts, opts.tasks), langs, opts.vocab_size,
                   vocab_type=opts.vocab_type, byte_fallback=opts.byte_fallback, specaugment=opts.specaugment,
                   routes=table)
    summary = {"manifests": {}, "dropped": dict(dropped), "langs": langs}
    for name, part in manifests.items():
        summary["manifests"][name] = {
            "rows": len(part), "hours": round(sum(int(r["n_frames"]) for r in part) / 360000, 4)}
    with atomic_path(out_dir / "prep.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    for name, s in summary["manifests"].items():
        logger.info(f"{out_dir / name}.tsv: {s['rows']} rows, {s['hours']:.2f} h")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# command line


def _csv_list(allowed: Sequence[str]):
    def parse(value: str) -> Tuple[str, ...]:
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [v for v in items if v not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {list(allowed)}, got {value!r}")
        return items

    return parse


def add_common_args(p: argparse.ArgumentParser, tasks: Sequence[str] = TASKS) -> None:
    g = p.add_argument_group("output (every recipe)")
    g.add_argument("--out-dir", required=True, type=Path, help="data directory to write (manifests, audio, vocab)")
    g.add_argument("--bandwidths", type=_csv_list(BANDWIDTHS), default=BANDWIDTHS,
                   help="rows to write: wb (the corpus audio), nb (telephone-band 8 kHz copies of WB audio; NB "
                        "sources stay as they are). Default: wb,nb")
    if len(tasks) > 1:
        g.add_argument("--tasks", type=_csv_list(tasks), default=tuple(tasks),
                       help=f"asr (transcript rows) and/or st (translation rows). Default: {','.join(tasks)}")
    g.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece vocabulary size (default 8000)")
    g.add_argument("--vocab-type", choices=["unigram", "bpe", "char"], default="unigram",
                   help="SentencePiece model type; 'bpe' with --byte-fallback is the paper's byte-level BPE")
    g.add_argument("--byte-fallback", action="store_true", help="SentencePiece byte fallback (BBPE with bpe)")
    g.add_argument("--audio-format", choices=["wav", "flac"], default="wav",
                   help="format of the audio the recipe writes (flac: about half the disk, slower to read)")
    g.add_argument("--max-train-seconds", type=float, default=30.0, help="drop longer train utterances (30)")
    g.add_argument("--decoder-routes", default=",".join(DEFAULT_DECODER_ROUTES),
                   help="decoder experts written to config.yaml, e.g. transcribe,translate:de,translate:es for one "
                        "ST expert per language (default: transcribe,translate)")
    g.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")


def options_from_args(a: argparse.Namespace, tasks: Sequence[str] = TASKS) -> Options:
    return Options(out_dir=a.out_dir, bandwidths=a.bandwidths, tasks=getattr(a, "tasks", tuple(tasks)),
                   vocab_size=a.vocab_size, vocab_type=a.vocab_type, byte_fallback=a.byte_fallback,
                   audio_format=a.audio_format, max_train_seconds=a.max_train_seconds, workers=a.workers,
                   decoder_routes=tuple(r.strip() for r in a.decoder_routes.split(",")))


def _user_error(e: BaseException) -> Optional[BaseException]:
    """The bad-input error behind ``e`` (parallel_map wraps worker errors in RuntimeError), else None."""
    while e is not None:
        if isinstance(e, (PrepError, audio.AudioError, FileNotFoundError)):
            return e
        e = e.__cause__ if isinstance(e, RuntimeError) else None
    return None


def run_cli(description: str, add_args: Callable[[argparse.ArgumentParser], None],
            read_corpus: Callable[[argparse.Namespace], List[Utterance]], argv=None,
            tasks: Sequence[str] = TASKS) -> int:
    """Parse arguments, read the corpus, prepare the data dir. Bad input exits 1 with one line naming the file."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    add_common_args(p, tasks)
    a = p.parse_args(argv)
    setup_logging()
    try:
        prepare(read_corpus(a), options_from_args(a, tasks))
    except KeyboardInterrupt:
        print(f"interrupted: finished audio in {a.out_dir} is kept, no manifest was half-written; rerun the same "
              f"command to continue", file=sys.stderr)
        return 130
    except (PrepError, RuntimeError, FileNotFoundError) as e:
        cause = _user_error(e)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 1
    return 0
