"""MuST-C -> S-MoE data directory: English ASR and en->X ST rows, WB talks plus telephone-band NB copies.

    python -m fairseq_smoe.prep.mustc --mustc-root /corpora/MUSTC_v1.0 --langs de,es --out-dir data/mustc

Reads MuST-C's own layout, ``<root>/en-<lang>/data/<split>/{wav/<talk>.wav, txt/<split>.yaml, txt/<split>.en,
txt/<split>.<lang>}``, where the yaml lists one segment (``duration``, ``offset``, ``speaker_id``, ``wav``) per
line of the text files. Segments are cut out of the talks into ``audio/<split>/wb/<talk>/``; ids follow fairseq's
``prep_mustc_data.py`` (``<talk>_<n>``, ``n`` counting the talk's segments by offset), prefixed with the pair
(``en-de_ted_1_0``) because each language pair segments the talks differently. English ASR rows come from the
first pair of ``--langs`` only, since the other pairs hold largely the same talks.
"""

import logging
from itertools import groupby
from pathlib import Path
from typing import Dict, List

import yaml

from .recipe import PrepError, Utterance, run_cli

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "tst-COMMON", "tst-HE")
SEGMENT_KEYS = ("duration", "offset", "wav")


def _number(seg: dict, key: str, where: str) -> float:
    try:
        return float(seg[key])
    except (TypeError, ValueError):
        raise PrepError(f"{where}: {key} {seg[key]!r} is not a number") from None


def read_split(root: Path, lang: str, split: str, with_asr: bool) -> List[Utterance]:
    """The segments of one split of the ``en-<lang>`` pair."""
    pair = f"en-{lang}"
    split_dir = root / pair / "data" / split
    txt = split_dir / "txt"
    yaml_path = txt / f"{split}.yaml"
    for needed in (split_dir / "wav", yaml_path, txt / f"{split}.en", txt / f"{split}.{lang}"):
        if not needed.exists():
            raise PrepError(f"{needed}: not found (MuST-C layout: {pair}/data/{split}/wav/*.wav, "
                            f"{pair}/data/{split}/txt/{split}.{{yaml,en,{lang}}}), or leave the split out with "
                            f"--splits")
    try:
        with open(yaml_path, encoding="utf-8") as f:
            segments = yaml.load(f, Loader=getattr(yaml, "CBaseLoader", yaml.BaseLoader))  # strings only, fast
    except yaml.YAMLError as e:
        raise PrepError(f"{yaml_path}: not valid YAML ({e})") from None
    if not isinstance(segments, list):
        raise PrepError(f"{yaml_path}: expected a list of segments, got {type(segments).__name__}")
    texts: Dict[str, List[str]] = {}
    for tl in ("en", lang):
        path = txt / f"{split}.{tl}"
        with open(path, encoding="utf-8") as f:
            texts[tl] = [line.rstrip("\n") for line in f]
        if len(texts[tl]) != len(segments):
            raise PrepError(f"{path}: {len(texts[tl])} lines, but {yaml_path} lists {len(segments)} segments")
    for i, seg in enumerate(segments):
        where = f"{yaml_path} entry {i + 1}"
        if not isinstance(seg, dict) or any(k not in seg for k in SEGMENT_KEYS):
            raise PrepError(f"{where}: a segment needs {list(SEGMENT_KEYS)}, got {seg!r}")
        seg["where"], seg["en"], seg["tgt"] = where, texts["en"][i], texts[lang][i]
        seg["_offset"], seg["_duration"] = _number(seg, "offset", where), _number(seg, "duration", where)

    utts = []
    for wav_name, talk_segments in groupby(segments, lambda s: s["wav"]):
        talk = Path(wav_name).stem
        for n, seg in enumerate(sorted(talk_segments, key=lambda s: s["_offset"])):
            utts.append(Utterance(
                id=f"{pair}_{talk}_{n}", split=split, source=str(split_dir / "wav" / wav_name), where=seg["where"],
                speaker=str(seg.get("speaker_id", "")), src_lang="en",
                transcript=seg["en"] if with_asr else None, translations={lang: seg["tgt"]},
                offset=seg["_offset"], duration=seg["_duration"], group=f"{pair}_{talk}",
            ))
    logger.info(f"{pair} {split}: {len(utts)} segments")
    return utts


def read_corpus(a) -> List[Utterance]:
    root = Path(a.mustc_root)
    if not root.is_dir():
        raise PrepError(f"--mustc-root {root}: not a directory")
    utts = []
    for k, lang in enumerate(a.langs.split(",")):
        pair_dir = root / f"en-{lang}"
        if not pair_dir.is_dir():
            raise PrepError(f"{pair_dir}: not found; --mustc-root must hold the en-<lang> folders of MuST-C")
        for split in a.splits.split(","):
            utts += read_split(root, lang, split, with_asr=(k == 0))
    return utts


def add_args(p):
    p.add_argument("--mustc-root", required=True, help="folder holding MuST-C's en-<lang>/ folders")
    p.add_argument("--langs", default="de", help="target languages, comma-separated (default: de)")
    p.add_argument("--splits", default=",".join(SPLITS), help=f"splits to prepare (default: {','.join(SPLITS)})")


def main(argv=None) -> int:
    return run_cli(__doc__, add_args, read_corpus, argv)


if __name__ == "__main__":
    raise SystemExit(main())
