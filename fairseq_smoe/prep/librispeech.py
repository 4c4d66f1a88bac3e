"""LibriSpeech -> S-MoE data directory (English ASR only): the WB flacs in place plus telephone-band NB copies.

    python -m fairseq_smoe.prep.librispeech --librispeech-root /corpora/LibriSpeech --out-dir data/librispeech

Reads LibriSpeech's own layout, ``<root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` with one
``<speaker>-<chapter>.trans.txt`` per chapter (``<utt id> <TRANSCRIPT>`` lines). The 16 kHz flacs are referenced
where they are (absolute paths), so only the NB copies take disk. Transcripts are lower-cased, as fairseq's
``prep_librispeech_data.py`` does (``--keep-case`` keeps LibriSpeech's upper case).
"""

import logging
from pathlib import Path
from typing import List

from ..routing import ASR_TASK
from .recipe import PrepError, Utterance, run_cli

logger = logging.getLogger(__name__)

SPLITS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other", "test-clean",
          "test-other")


def read_split(root: Path, split: str, keep_case: bool) -> List[Utterance]:
    split_dir = root / split
    if not split_dir.is_dir():
        raise PrepError(f"{split_dir}: not found (LibriSpeech layout: <root>/{split}/<speaker>/<chapter>/)")
    utts = []
    trans_files = sorted(split_dir.glob("*/*/*.trans.txt"))
    if not trans_files:
        raise PrepError(f"{split_dir}: no <speaker>/<chapter>/<speaker>-<chapter>.trans.txt files")
    for trans in trans_files:
        speaker, chapter = trans.parent.parent.name, trans.parent.name
        if trans.name != f"{speaker}-{chapter}.trans.txt":
            raise PrepError(f"{trans}: expected the name {speaker}-{chapter}.trans.txt for its folder")
        with open(trans, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{trans}:{line_no}"
                parts = line.rstrip("\n").split(" ", 1)
                uid = parts[0]
                if len(parts) < 2 or not parts[1].strip() or not uid.startswith(f"{speaker}-{chapter}-"):
                    raise PrepError(f"{where}: expected '{speaker}-{chapter}-<utt> TRANSCRIPT', got {line.strip()!r}")
                flac = trans.parent / f"{uid}.flac"
                if not flac.is_file():
                    raise PrepError(f"{where}: audio file {flac} not found")
                text = parts[1] if keep_case else parts[1].lower()
                utts.append(Utterance(id=uid, split=split, source=str(flac), where=where, speaker=speaker,
                                      src_lang="en", transcript=text, group=speaker))
    logger.info(f"{split}: {len(utts)} utterances in {len(trans_files)} chapters")
    return utts


def read_corpus(a) -> List[Utterance]:
    root = Path(a.librispeech_root)
    if not root.is_dir():
        raise PrepError(f"--librispeech-root {root}: not a directory")
    splits = a.splits.split(",") if a.splits else [s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        raise PrepError(f"{root}: holds none of the LibriSpeech splits {list(SPLITS)}")
    return [u for split in splits for u in read_split(root, split, a.keep_case)]


def add_args(p):
    p.add_argument("--librispeech-root", required=True, help="the LibriSpeech/ folder holding the split folders")
    p.add_argument("--splits", default="", help="splits to prepare, comma-separated (default: every one present)")
    p.add_argument("--keep-case", action="store_true", help="keep the upper-case transcripts")


def main(argv=None) -> int:
    return run_cli(__doc__, add_args, read_corpus, argv, tasks=(ASR_TASK,))


if __name__ == "__main__":
    raise SystemExit(main())
