"""What every data-preparation pipeline shares (the public-corpus recipes of :mod:`.recipe` and the offline corpus
of :mod:`.offline`): atomic writes, parallel audio work with progress, manifest rows in the plugin's format, and the
one writer of a data directory, :func:`write_data_dir` (vocabulary, ``config.yaml``, manifests).

Every output is written to a temporary name and renamed when complete, so an interrupted run leaves no
half-written file, and a rerun skips outputs that already exist (:func:`remove_stale_tmp` clears the temporaries a
killed run left behind).
"""

import csv
import logging
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import yaml

from ..data import audio
from ..data.manifest import MANIFEST_COLUMNS  # the column list lives there; manifest_row and write_manifest use it
from ..data.vocab import build_vocab, guiding_tokens
from ..routing import DEFAULT_ASR_TASKS, DEFAULT_DECODER_ROUTES, TASK_TO_GUIDING_TOKEN, RoutingTable, smoe_config

logger = logging.getLogger(__name__)

# temporary names of atomic writes (atomic_path, vocab.build_vocab) left behind by a killed run
_STALE_TMP = re.compile(r"^\..+\.tmp(\d+|\.model|\.vocab)?$")


class PrepError(ValueError):
    """Bad corpus input; the message names the file and the row or entry."""


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


def manifest_row(**fields) -> Dict:
    """One manifest row: every pipeline builds its rows here, so a row holds exactly :data:`MANIFEST_COLUMNS`."""
    missing = [k for k in MANIFEST_COLUMNS if k not in fields]
    extra = sorted(set(fields) - set(MANIFEST_COLUMNS))
    if missing or extra:
        raise ValueError(f"manifest row {fields.get('id')!r}: missing column(s) {missing}, unknown column(s) {extra}")
    return {k: fields[k] for k in MANIFEST_COLUMNS}


def clean_text(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def n_frames_of(num_samples: int, sr: int) -> int:
    """fbank frames of a clip once resampled to 16 kHz (the manifest's ``n_frames``).

    torchaudio's resampler returns ``ceil(n * 16000 / sr)`` samples (rounding would be one short for e.g. 22.05 kHz).
    """
    return audio.num_fbank_frames(-(-num_samples * audio.TARGET_SAMPLE_RATE // sr))


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


def write_config(out_dir: Path, vocab_cfg: Dict, specaugment: bool = True,
                 routes: Optional[RoutingTable] = None) -> Path:
    """``config.yaml`` with utterance CMVN, optional SpecAugment (LB policy) and the S-MoE routes (``routes``, else
    the defaults; :func:`fairseq_smoe.routing.smoe_config` writes the section, with the table's tasks and ASR tasks
    where they are not the defaults)."""
    if routes is None:
        smoe = smoe_config()
    else:
        smoe = smoe_config(routes.encoder_routes, routes.decoder_routes,
                           tasks=None if routes.tasks == TASK_TO_GUIDING_TOKEN else routes.tasks,
                           asr_tasks=None if routes.asr_tasks == DEFAULT_ASR_TASKS else routes.asr_tasks)
    cfg = {
        "input_feat_per_channel": 80,
        **vocab_cfg,
        "transforms": {"*": ["utterance_cmvn"], "_train": ["utterance_cmvn"] + (["specaugment"] if specaugment else [])},
        "utterance_cmvn": {"norm_means": True, "norm_vars": True},
        "specaugment": {"freq_mask_F": 27, "freq_mask_N": 1, "time_mask_N": 1, "time_mask_T": 100,
                        "time_mask_p": 1.0, "time_wrap_W": 0},
        "smoe": smoe,
    }
    path = Path(out_dir) / "config.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def write_vocab(out_dir: Path, texts: Iterable[str], langs: Iterable[str], vocab_size: int,
                model_type: str = "unigram", byte_fallback: bool = False,
                task_tokens: Sequence[str] = DEFAULT_DECODER_ROUTES) -> Dict:
    """SentencePiece model + fairseq dictionary with the guiding tokens of ``task_tokens`` and ``langs`` (skipped if
    both exist)."""
    out_dir = Path(out_dir)
    if (out_dir / "spm.model").exists() and (out_dir / "spm.txt").exists():
        logger.info(f"{out_dir}/spm.model exists, kept")
        return {"bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": "spm.model"},
                "vocab_filename": "spm.txt"}
    return build_vocab(texts, str(out_dir), list(langs), vocab_size, model_type, byte_fallback=byte_fallback,
                       task_tokens=task_tokens)


def check_vocab_covers(out_dir: Path, langs: Sequence[str],
                       task_tokens: Sequence[str] = DEFAULT_DECODER_ROUTES) -> None:
    """A vocabulary kept from an earlier run must hold the guiding tokens this run's rows need."""
    dict_path = Path(out_dir) / "spm.txt"
    have = {line.split(" ", 1)[0] for line in dict_path.read_text(encoding="utf-8").splitlines()}
    missing = [t for t in guiding_tokens(langs, task_tokens) if t not in have]
    if missing:
        raise PrepError(f"{dict_path} (from an earlier run) lacks {missing}; delete {out_dir}/spm.model and "
                        f"{dict_path} to train a vocabulary for the languages of this run")


def write_data_dir(out_dir: Path, manifests: Dict[str, Sequence[Dict]], vocab_texts: Sequence[str],
                   langs: Sequence[str], vocab_size: int, vocab_type: str = "unigram", byte_fallback: bool = False,
                   specaugment: bool = True, routes: Optional[RoutingTable] = None) -> None:
    """The end of every prep pipeline, once its audio is on disk: the vocabulary (trained on ``vocab_texts`` with
    the guiding tokens of the routes' tasks and decoder routes and of ``langs``; one kept from an earlier run must
    cover them), ``config.yaml`` (``routes``, else the default routes), then ``<name>.tsv`` for every entry of
    ``manifests``, in the given order.

    The manifests come last, so a data directory with manifests is complete; each file is written atomically, and
    a rerun keeps the vocabulary and rewrites the same config and manifests.
    """
    out_dir = Path(out_dir)
    table = routes if routes is not None else RoutingTable()
    task_tokens = [*table.tasks.values(), *table.decoder_routes]  # guiding_tokens: one <token> per name, in order
    if (out_dir / "spm.model").exists() and (out_dir / "spm.txt").exists():
        check_vocab_covers(out_dir, langs, task_tokens)
    try:
        vocab_cfg = write_vocab(out_dir, vocab_texts, langs, vocab_size, model_type=vocab_type,
                                byte_fallback=byte_fallback, task_tokens=task_tokens)
    except RuntimeError as e:  # SentencePiece's own message says what to change (e.g. a too small --vocab-size)
        raise PrepError(f"{out_dir / 'spm.model'}: SentencePiece cannot train it: {e}") from None
    write_config(out_dir, vocab_cfg, specaugment=specaugment, routes=routes)
    for name, rows in manifests.items():
        write_manifest(out_dir / f"{name}.tsv", rows)


def remove_stale_tmp(out_dir: Path) -> int:
    """Delete the temporary files of atomic writes a killed run left behind (they never replaced a finished
    file); returns how many."""
    n = 0
    for dirpath, _, files in os.walk(out_dir):
        for name in files:
            if _STALE_TMP.match(name):
                os.unlink(os.path.join(dirpath, name))
                n += 1
    return n


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stderr)
