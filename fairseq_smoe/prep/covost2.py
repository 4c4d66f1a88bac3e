"""CoVoST 2 -> S-MoE data directory: ASR in the source language and ST into the target, from Common Voice mp3s.

    python -m fairseq_smoe.prep.covost2 --cv-root /corpora/cv-corpus-4/en --src-lang en --tgt-lang de \\
        --out-dir data/covost2

Reads Common Voice's language folder (``clips/*.mp3``, ``validated.tsv`` with ``client_id``, ``path``, ``sentence``)
and CoVoST 2's translations, in either of their released forms (looked up in ``--covost-dir``, default
``--cv-root``):

* ``covost_v2.<src>_<tgt>.tsv`` (``path``, ``translation``, ``split``), joined with ``validated.tsv`` on ``path``
  exactly as fairseq's ``prep_covost_data.py`` does: ``train`` is ``train`` + ``train_covost``; clips missing from
  ``validated.tsv`` are dropped (counted in the log);
* the pre-split ``covost_v2.<src>_<tgt>.<split>.tsv`` files of CoVoST's ``get_covost_splits.py`` (``path``,
  ``sentence``, ``translation``, ``client_id``), which need no ``validated.tsv``.

Both are read like fairseq reads them (tab-separated, no quoting, ``\\`` escapes). The mp3s are decoded with
soundfile (libsndfile >= 1.1 reads mp3; the pinned soundfile wheel bundles 1.2) and written as 16 kHz wav, plus
their telephone-band NB copies. Ids are the clip names without ``.mp3``, as in fairseq.
"""

import csv
import logging
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

from .recipe import PrepError, Utterance, run_cli

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


def read_tsv(path: Path, required: Sequence[str]) -> Iterator[Tuple[str, Dict[str, str]]]:
    """``(where, row)`` per line of a Common Voice / CoVoST TSV; a missing column or a ragged line is an error."""
    if not path.is_file():
        raise PrepError(f"{path}: not found")
    csv.field_size_limit(1 << 24)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        header = next(reader, None)
        if header is None:
            raise PrepError(f"{path}: empty file")
        missing = [c for c in required if c not in header]
        if missing:
            raise PrepError(f"{path}: missing column(s) {missing}; header is {header}")
        for fields in reader:
            where = f"{path}:{reader.line_num}"
            if len(fields) != len(header):
                raise PrepError(f"{where}: {len(fields)} tab-separated fields, the header has {len(header)}")
            yield where, dict(zip(header, fields))


def clip_path(clips: Path, name: str, where: str) -> Path:
    path = clips / name
    if not path.is_file() and (clips / f"{name}.mp3").is_file():  # early Common Voice releases: no extension
        path = clips / f"{name}.mp3"
    if not path.is_file():
        raise PrepError(f"{where}: audio file {path} not found")
    return path


def covost_rows(a) -> Dict[str, List[Tuple[str, Dict[str, str]]]]:
    """Rows with path, sentence, translation, client_id per requested split, from either CoVoST form."""
    cv_root, covost_dir = Path(a.cv_root), Path(a.covost_dir or a.cv_root)
    stem = f"covost_v2.{a.src_lang}_{a.tgt_lang}"
    splits = a.splits.split(",")
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise PrepError(f"--splits: unknown split(s) {bad}; CoVoST 2 has {list(SPLITS)}")
    joint = covost_dir / f"{stem}.tsv"
    out: Dict[str, List[Tuple[str, Dict[str, str]]]] = {s: [] for s in splits}
    if joint.is_file():
        validated = {row["path"]: row for _, row in read_tsv(cv_root / "validated.tsv",
                                                              ["client_id", "path", "sentence"])}
        missing = 0
        for where, row in read_tsv(joint, ["path", "translation", "split"]):
            split = "train" if row["split"] == "train_covost" else row["split"]
            if split not in out:
                continue
            cv = validated.get(row["path"])
            if cv is None:  # fairseq's inner join
                missing += 1
                continue
            out[split].append((where, {"path": row["path"], "sentence": cv["sentence"],
                                       "translation": row["translation"], "client_id": cv["client_id"]}))
        if missing:
            logger.warning(f"{joint}: {missing} clip(s) of the requested splits are not in "
                           f"{cv_root / 'validated.tsv'} and were skipped (fairseq's recipe does the same)")
    else:
        for split in splits:
            path = covost_dir / f"{stem}.{split}.tsv"
            if not path.is_file():
                raise PrepError(f"neither {joint} nor {path} exists: put CoVoST 2's {stem}.tsv (or the split files "
                                f"of get_covost_splits.py) in --covost-dir")
            out[split] = list(read_tsv(path, ["path", "sentence", "translation", "client_id"]))
    return out


def read_corpus(a) -> List[Utterance]:
    cv_root = Path(a.cv_root)
    clips = cv_root / "clips"
    if not clips.is_dir():
        raise PrepError(f"{clips}: not found; --cv-root must be Common Voice's language folder (clips/, "
                        f"validated.tsv)")
    if a.src_lang == a.tgt_lang or "en" not in (a.src_lang, a.tgt_lang):
        raise PrepError(f"CoVoST 2 pairs are en->X or X->en, got {a.src_lang}->{a.tgt_lang}")
    utts = []
    for split, rows in covost_rows(a).items():
        for where, row in rows:
            path = clip_path(clips, row["path"], where)
            uid = Path(row["path"]).name
            uid = uid[:-4] if uid.endswith(".mp3") else uid
            utts.append(Utterance(
                id=uid, split=split, source=str(path), where=where, speaker=row["client_id"],
                src_lang=a.src_lang, transcript=row["sentence"], translations={a.tgt_lang: row["translation"]},
                group=uid[-2:],
            ))
        logger.info(f"{a.src_lang}->{a.tgt_lang} {split}: {len(rows)} clips")
    return utts


def add_args(p):
    p.add_argument("--cv-root", required=True, help="Common Voice language folder (clips/, validated.tsv)")
    p.add_argument("--covost-dir", default=None,
                   help="folder of covost_v2.<src>_<tgt>.tsv or its .train/.dev/.test.tsv splits (default: --cv-root)")
    p.add_argument("--src-lang", default="en", help="source (audio) language (default: en)")
    p.add_argument("--tgt-lang", required=True, help="target language of the translations, e.g. de")
    p.add_argument("--splits", default=",".join(SPLITS), help=f"splits to prepare (default: {','.join(SPLITS)})")


def main(argv=None) -> int:
    return run_cli(__doc__, add_args, read_corpus, argv)


if __name__ == "__main__":
    raise SystemExit(main())
