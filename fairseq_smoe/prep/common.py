"""Shared pieces of every data-preparation recipe: atomic writes, parallel audio work with progress, telephone-band
copies of wideband audio, manifests in the plugin's format, and ``config.yaml``.

Every output is written to a temporary name and renamed when complete, so an interrupted run leaves no
half-written file, and a rerun skips outputs that already exist.
"""

import csv
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import yaml

from ..data import audio
from ..data.vocab import build_vocab

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["id", "audio", "n_frames", "tgt_text", "speaker", "task", "src_lang", "tgt_lang", "bandwidth"]


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; it replaces ``path`` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_wav(path: Path, wav: np.ndarray, sr: int) -> None:
    import soundfile as sf

    with atomic_path(path) as tmp:
        sf.write(str(tmp), wav, sr, subtype="PCM_16", format="WAV")


AUDIO_WRITE_FORMATS = {".wav": "WAV", ".flac": "FLAC"}


def write_audio(path: Path, wav: np.ndarray, sr: int) -> None:
    """16-bit ``.wav`` or ``.flac`` (format from the suffix), written atomically."""
    import soundfile as sf

    fmt = AUDIO_WRITE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: can only write {sorted(AUDIO_WRITE_FORMATS)} audio")
    with atomic_path(path) as tmp:
        sf.write(str(tmp), wav, sr, subtype="PCM_16", format=fmt)


def write_manifest(path: Path, rows: Sequence[Dict[str, str]], columns: Sequence[str] = MANIFEST_COLUMNS) -> None:
    """TSV in the plugin's manifest format; text fields must not hold tabs or newlines."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(columns), delimiter="\t", quoting=csv.QUOTE_NONE,
                               escapechar=None, lineterminator="\n", extrasaction="ignore")
            w.writeheader()
            for r in rows:
                for k in columns:
                    v = str(r.get(k, ""))
                    if "\t" in v or "\n" in v:
                        raise ValueError(f"{path}: field {k} of row {r.get('id')} holds a tab or newline")
                w.writerow(r)


def clean_text(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def n_frames_of(num_samples: int, sr: int) -> int:
    """fbank frames of a clip once resampled to 16 kHz (the manifest's ``n_frames``).

    torchaudio's resampler returns ``ceil(n * 16000 / sr)`` samples (rounding would be one short for e.g. 22.05 kHz).
    """
    return audio.num_fbank_frames(-(-num_samples * audio.TARGET_SAMPLE_RATE // sr))


def make_nb_copy(src: str, dst: str) -> int:
    """Telephone-band 8 kHz copy of ``src`` at ``dst`` (skipped if present); returns its sample count."""
    import soundfile as sf

    dst_p = Path(dst)
    if dst_p.exists():
        return sf.info(dst).frames
    wav, sr = audio.read_waveform(audio.AudioRef(src))
    nb = audio.telephone_channel(wav, sr)
    write_wav(dst_p, nb, 8000)
    return len(nb)


def parallel_map(fn: Callable, items: Sequence, what: str, workers: Optional[int] = None) -> List:
    """``[fn(x) for x in items]`` on all cores, logging progress about every 5 s; errors name the item."""
    workers = workers or max(1, os.cpu_count() or 1)
    results: List = [None] * len(items)
    start = last = time.time()
    if workers == 1 or len(items) < 4:
        for i, x in enumerate(items):
            results[i] = _call(fn, x)
            if time.time() - last > 5:
                last = time.time()
                logger.info(f"{what}: {i + 1}/{len(items)}")
    else:
        with ProcessPoolExecutor(workers) as pool:
            for i, r in enumerate(pool.map(_call_star, [(fn, x) for x in items], chunksize=8)):
                results[i] = r
                if time.time() - last > 5:
                    last = time.time()
                    logger.info(f"{what}: {i + 1}/{len(items)} ({(i + 1) / (last - start):.1f}/s)")
    logger.info(f"{what}: {len(items)} done in {time.time() - start:.1f}s")
    return results


def _call(fn, x):
    try:
        return fn(*x) if isinstance(x, tuple) else fn(x)
    except Exception as e:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)}({x!r}): {e}") from e


def _call_star(args):
    fn, x = args
    return _call(fn, x)


def write_config(out_dir: Path, vocab_cfg: Dict, specaugment: bool = True, extra: Optional[Dict] = None) -> Path:
    """``config.yaml`` with utterance CMVN, optional SpecAugment (LB policy) and the default S-MoE routes."""
    cfg = {
        "input_feat_per_channel": 80,
        **vocab_cfg,
        "transforms": {"*": ["utterance_cmvn"], "_train": ["utterance_cmvn"] + (["specaugment"] if specaugment else [])},
        "utterance_cmvn": {"norm_means": True, "norm_vars": True},
        "specaugment": {"freq_mask_F": 27, "freq_mask_N": 1, "time_mask_N": 1, "time_mask_T": 100,
                        "time_mask_p": 1.0, "time_wrap_W": 0},
        "smoe": {"encoder_routes": ["wb", "nb"], "decoder_routes": ["transcribe", "translate"]},
    }
    cfg.update(extra or {})
    path = Path(out_dir) / "config.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def write_vocab(out_dir: Path, texts: Iterable[str], langs: Iterable[str], vocab_size: int,
                model_type: str = "unigram", byte_fallback: bool = False) -> Dict:
    """SentencePiece model + fairseq dictionary with the guiding tokens (skipped if both exist)."""
    out_dir = Path(out_dir)
    if (out_dir / "spm.model").exists() and (out_dir / "spm.txt").exists():
        logger.info(f"{out_dir}/spm.model exists, kept")
        return {"bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": "spm.model"},
                "vocab_filename": "spm.txt"}
    return build_vocab(texts, str(out_dir), list(langs), vocab_size, model_type, byte_fallback=byte_fallback)


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stderr)
