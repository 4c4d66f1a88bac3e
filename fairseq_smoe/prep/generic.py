"""A folder of audio + a TSV of transcripts and/or translations -> S-MoE data directory.

    python -m fairseq_smoe.prep.generic --tsv my_corpus.tsv --out-dir data/mine [--audio-root /corpora/mine]

The TSV is tab-separated with a header line and no quoting; one row per utterance and target language:

  column        required  meaning
  audio         yes       audio file (wav, flac, ogg, mp3, ... anything soundfile reads), relative to --audio-root
                          (default: the TSV's folder) or absolute
  transcript    one of    what is said (ASR row; language: src_lang)
  translation   these     its translation (ST row; language: tgt_lang)
  tgt_lang      with a    language of ``translation`` (default: --tgt-lang)
                translation
  src_lang      no        language of the speech (default: --src-lang, en)
  id            no        utterance id (default: the audio file's name without extension); rows with the same id
                          are one utterance with several translations (same audio, one transcript)
  speaker       no        speaker label
  split         no        train, dev, test, ... (default: --split, train); names starting with "train" train
  bandwidth     no        nb or wb; default from the sample rate (below 16 kHz: nb). Use it for NB speech stored
                          at 16 kHz
  offset        no        seconds into ``audio`` where the utterance starts (with ``duration``: segments of long
  duration                recordings are cut out and written)

WB audio gets telephone-band NB copies with ``--bandwidths wb,nb`` (the default); NB audio is used as it is.
Whole mono wav/flac/ogg files at 8-48 kHz are referenced in place; other audio is converted to 16-bit wav.
"""

import csv
import logging
import re
from pathlib import Path
from typing import Dict, List

from ..routing import BANDWIDTHS
from .recipe import PrepError, Utterance, run_cli

logger = logging.getLogger(__name__)

COLUMNS = ("audio", "transcript", "translation", "tgt_lang", "src_lang", "id", "speaker", "split", "bandwidth",
           "offset", "duration")


def _seconds(row: Dict[str, str], key: str, where: str):
    value = row.get(key, "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise PrepError(f"{where}: {key} {value!r} is not a number of seconds") from None


def read_tsv(path: Path, audio_root: Path, a) -> List[Utterance]:
    if not path.is_file():
        raise PrepError(f"--tsv {path}: not found")
    utts: Dict[str, Utterance] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [h.strip() for h in next(reader, [])]
        unknown = [h for h in header if h not in COLUMNS]
        if unknown or "audio" not in header or not {"transcript", "translation"} & set(header):
            raise PrepError(f"{path}: header {header} must have 'audio' and 'transcript' and/or 'translation'"
                            + (f"; unknown column(s) {unknown} (known: {list(COLUMNS)})" if unknown else ""))
        for fields in reader:
            where = f"{path}:{reader.line_num}"
            if not any(x.strip() for x in fields):
                continue
            if len(fields) != len(header):
                raise PrepError(f"{where}: {len(fields)} tab-separated fields, the header has {len(header)}")
            row = dict(zip(header, (x.strip() for x in fields)))
            utt = _utterance(row, where, audio_root, a)
            first = utts.get(utt.id)
            if first is None:
                utts[utt.id] = utt
            else:
                _merge(first, utt)
    logger.info(f"{path}: {len(utts)} utterances")
    return list(utts.values())


def _utterance(row: Dict[str, str], where: str, audio_root: Path, a) -> Utterance:
    if not row["audio"]:
        raise PrepError(f"{where}: empty audio")
    transcript = row.get("transcript") or None
    translation = row.get("translation") or None
    if transcript is None and translation is None:
        raise PrepError(f"{where}: neither a transcript nor a translation")
    tgt_lang = row.get("tgt_lang") or a.tgt_lang
    if translation is not None and not tgt_lang:
        raise PrepError(f"{where}: a translation needs its language (tgt_lang column or --tgt-lang)")
    bandwidth = row.get("bandwidth") or None
    if bandwidth is not None and bandwidth not in BANDWIDTHS:
        raise PrepError(f"{where}: bandwidth {bandwidth!r} is not {' or '.join(sorted(BANDWIDTHS))}")
    offset, duration = _seconds(row, "offset", where), _seconds(row, "duration", where)
    if (offset is None) != (duration is None):
        raise PrepError(f"{where}: give both offset and duration, or neither")
    source = Path(row["audio"])
    source = source if source.is_absolute() else audio_root / source
    uid = row.get("id") or re.sub(r"[^\w.\-]", "_", source.stem) + (f"_{offset:g}" if offset is not None else "")
    return Utterance(
        id=uid, split=row.get("split") or a.split, source=str(source), where=where, speaker=row.get("speaker", ""),
        src_lang=row.get("src_lang") or a.src_lang, transcript=transcript,
        translations={tgt_lang: translation} if translation is not None else {},
        offset=offset, duration=duration, bandwidth=bandwidth,
    )


def _merge(first: Utterance, other: Utterance) -> None:
    """A second row of the same utterance adds a translation; anything else must agree."""
    for key in ("source", "offset", "duration", "split", "src_lang", "bandwidth"):
        if getattr(first, key) != getattr(other, key):
            raise PrepError(f"{other.where}: id {other.id!r} was first used at {first.where} with {key} "
                            f"{getattr(first, key)!r}, here {getattr(other, key)!r}; ids must be unique")
    if other.transcript is not None:
        if first.transcript not in (None, other.transcript):
            raise PrepError(f"{other.where}: id {other.id!r} has another transcript at {first.where}")
        first.transcript = other.transcript
    for lang, text in other.translations.items():
        if lang in first.translations:
            raise PrepError(f"{other.where}: id {other.id!r} already has a {lang} translation at {first.where}")
        first.translations[lang] = text


def read_corpus(a) -> List[Utterance]:
    utts = []
    for tsv in a.tsv:
        tsv = Path(tsv)
        utts += read_tsv(tsv, Path(a.audio_root) if a.audio_root else tsv.parent, a)
    return utts


def add_args(p):
    p.add_argument("--tsv", required=True, nargs="+", help="the TSV file(s) described above")
    p.add_argument("--audio-root", default=None, help="base of relative audio paths (default: each TSV's folder)")
    p.add_argument("--src-lang", default="en", help="speech language where there is no src_lang column (en)")
    p.add_argument("--tgt-lang", default=None, help="translation language where there is no tgt_lang column")
    p.add_argument("--split", default="train", help="split where there is no split column (train)")


def main(argv=None) -> int:
    return run_cli(__doc__, add_args, read_corpus, argv)


if __name__ == "__main__":
    raise SystemExit(main())
