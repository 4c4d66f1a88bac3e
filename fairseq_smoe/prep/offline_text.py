"""Human parallel text from Debian: package-description translations aligned sentence by sentence.

apt's ``Translation-xx`` files (fetched with ``apt-get update -o Acquire::Languages=en,es,de``) hold every package
description in one language, keyed by ``Description-md5`` of the English original. Descriptions with the same md5
are the same text: their paragraphs are paired when both have the same number, and the sentences of a paragraph pair
when both have the same number and similar lengths. Only short, speakable sentences are kept (plain words, no code,
no acronyms, no digits), so a TTS voice can read them and a small model can learn them.
"""

import bz2
import gzip
import logging
import lzma
import re
import subprocess
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

APT_HELPER = "/usr/lib/apt/apt-helper"

# letters per language, for the speakable-word check
_LETTERS = {"en": "a-z", "es": "a-záéíóúüñ", "de": "a-zäöüß"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-ZÁÉÍÓÚÑÄÖÜ¿¡])")


def read_text_file(path: Path) -> str:
    """A text file as apt stores it: plain, .gz, .xz, .bz2, or (through apt's own helper) .lz4 / .zst."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        if suffix in (".xz", ".lzma"):
            with lzma.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        if suffix == ".bz2":
            with bz2.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        if suffix in (".lz4", ".zst"):
            proc = subprocess.run([APT_HELPER, "cat-file", str(path)], capture_output=True)
            if proc.returncode != 0:
                raise ValueError(f"{APT_HELPER} cat-file failed: {proc.stderr.decode(errors='replace').strip()}")
            return proc.stdout.decode("utf-8")
        return path.read_text(encoding="utf-8")
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None


def parse_deb822(text: str, source: str = "<text>") -> Iterator[Dict[str, str]]:
    """Stanzas of a Debian control-style file; continuation lines keep their leading space."""
    stanza: Dict[str, str] = {}
    key = None
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
            continue
        if line[0] in " \t":
            if key is None:
                raise ValueError(f"{source}:{lineno}: continuation line before any field")
            stanza[key] += "\n" + line
            continue
        if ":" not in line:
            raise ValueError(f"{source}:{lineno}: not a 'Field: value' line: {line[:60]!r}")
        key, value = line.split(":", 1)
        stanza[key] = value.strip()
    if stanza:
        yield stanza


def read_translations(path: Path, lang: str) -> Dict[str, str]:
    """``{Description-md5: description}`` of one ``Translation-xx`` file."""
    field = f"Description-{lang}"
    out = {}
    for st in parse_deb822(read_text_file(path), str(path)):
        if field in st and "Description-md5" in st:
            out[st["Description-md5"]] = st[field]
    if not out:
        raise ValueError(f"{path}: no {field} entries; is it a Translation-{lang} file?")
    return out


def find_translation_files(directory: Path, lang: str) -> List[Path]:
    """apt's list files for ``lang`` (``*Translation-xx`` with any compression) in ``directory``."""
    return sorted(p for p in Path(directory).glob(f"*Translation-{lang}*") if not p.name.endswith((".diff", ".IndexDiff")))


def paragraphs(description: str) -> List[str]:
    """Paragraphs of a description: the synopsis, then the long description's wrapped paragraphs.

    Verbatim lines (two leading spaces: lists, code) end a paragraph and are dropped.
    """
    lines = description.split("\n")
    out = [lines[0].strip()]
    current: List[str] = []
    for line in lines[1:]:
        if line.strip() == "." or line.startswith("  ") or line.startswith("\t"):
            if current:
                out.append(" ".join(current))
            current = []
            if line.strip() != ".":
                out.append("")  # a verbatim block still counts as a paragraph so the others stay aligned
            continue
        current.append(line.strip())
    if current:
        out.append(" ".join(current))
    return out


def sentences(paragraph: str) -> List[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def load_lexicon(path: Path = Path("/usr/share/dict/words")) -> Optional[frozenset]:
    """Lower-cased English word list (Debian's ``wamerican``), or ``None`` when it is not installed."""
    path = Path(path)
    if not path.is_file():
        return None
    return frozenset(w.strip().lower() for w in path.read_text(encoding="utf-8", errors="replace").split("\n")
                     if w.strip())


def is_speakable(sentence: str, lang: str, min_words: int = 3, max_words: int = 20,
                 lexicon: Optional[frozenset] = None) -> bool:
    """Plain words a TTS voice reads as written: no digits, symbols, acronyms, CamelCase or file names.

    With a ``lexicon`` every word (each part of a hyphenated one) must be in it, which drops package and
    program names such as "libfoo" or "mlterm".
    """
    letters = _LETTERS.get(lang, "a-z")
    text = sentence.rstrip(".!?").strip()
    words = text.split()
    if not min_words <= len(words) <= max_words:
        return False
    word_re = re.compile(rf"^[{letters}{letters.upper()}]?[{letters}]+(?:['-][{letters}]+)*[,;:]?$")
    for i, w in enumerate(words):
        if not word_re.match(w):
            return False
        if i > 0 and w[0].isupper() and lang != "de":  # proper names and acronyms mid-sentence
            return False
        if lexicon is not None and not all(part in lexicon for part in w.rstrip(",;:").lower().split("-")):
            return False
    return True


def align_description(en: str, other: str) -> List[Tuple[str, str]]:
    """Sentence pairs of one description and its translation (empty when the structure differs)."""
    pe, po = paragraphs(en), paragraphs(other)
    if len(pe) != len(po):
        return []
    pairs = []
    for a, b in zip(pe, po):
        sa, sb = sentences(a), sentences(b)
        if len(sa) != len(sb):
            continue
        for x, y in zip(sa, sb):
            ratio = len(y) / max(1, len(x))
            if 0.5 <= ratio <= 2.0:
                pairs.append((x, y))
    return pairs


@dataclass(frozen=True)
class SentencePair:
    en: str
    tgt: str
    lang: str


def aligned_pairs(translation_dir: Path, langs: Sequence[str], max_words: int = 20,
                  lexicon: Optional[frozenset] = None) -> Dict[str, List[SentencePair]]:
    """Speakable en-xx sentence pairs for each ``lang`` from the ``Translation-*`` files in ``translation_dir``.

    Deterministic order (by md5, then position); an English sentence appears once per language.
    """
    translation_dir = Path(translation_dir)
    en_files = find_translation_files(translation_dir, "en")
    if not en_files:
        raise FileNotFoundError(
            f"{translation_dir}: no Translation-en file (run recipes/offline/setup.sh, which fetches them with "
            "apt-get update -o Acquire::Languages=en,es,de)")
    english: Dict[str, str] = {}
    for f in en_files:
        english.update(read_translations(f, "en"))
    out = {}
    for lang in langs:
        files = find_translation_files(translation_dir, lang)
        if not files:
            raise FileNotFoundError(f"{translation_dir}: no Translation-{lang} file")
        other: Dict[str, str] = {}
        for f in files:
            other.update(read_translations(f, lang))
        seen = set()
        pairs = []
        for md5 in sorted(set(english) & set(other)):
            for en, tgt in align_description(english[md5], other[md5]):
                if en in seen or not is_speakable(en, "en", max_words=max_words, lexicon=lexicon) \
                        or not is_speakable(tgt, lang, max_words=max_words + 5):
                    continue
                seen.add(en)
                pairs.append(SentencePair(en, tgt, lang))
        logger.info(f"Debian descriptions: {len(pairs)} speakable en-{lang} sentence pairs "
                    f"from {len(set(english) & set(other))} translated descriptions")
        out[lang] = pairs
    return out


# ---- target text normalisation -------------------------------------------------------------------------------

_ONES = {
    "en": "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen".split(),
    "es": "cero uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce quince dieciséis "
          "diecisiete dieciocho diecinueve".split(),
    "de": "null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn vierzehn fünfzehn sechzehn "
          "siebzehn achtzehn neunzehn".split(),
}
_TENS_EN = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int, lang: str) -> Optional[str]:
    """0-19 in en/es/de and 20-99 in en, as spoken; ``None`` for anything else."""
    if 0 <= n < 20:
        return _ONES[lang][n]
    if lang == "en" and 20 <= n < 100:
        tens, ones = divmod(n, 10)
        return _TENS_EN[tens - 2] + ("" if ones == 0 else " " + _ONES["en"][ones])
    return None


def normalize_target(text: str, lang: str) -> Optional[str]:
    """Lower-case words without punctuation, numbers spelled out: what the models learn to output.

    ``None`` when the text holds something that cannot be written as spoken words (symbols, big numbers,
    bracketed non-speech such as ``[beep]``).
    """
    text = unicodedata.normalize("NFC", text).strip()
    if not text or "[" in text or re.search(r"[*#@/&%$+=<>_\\|~^]", text):
        return None
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    out = []
    for tok in re.findall(r"\d+(?:\.\d+)?|[^\W\d_]+(?:'[^\W\d_]+)*", text.lower()):
        if tok[0].isdigit():
            if "." in tok:
                return None
            words = number_words(int(tok), lang)
            if words is None:
                return None
            out.append(words)
        else:
            out.append(tok)
    if any(ch.isdigit() for ch in text) and re.search(r"\d[^\W\d_]|[^\W\d_]\d", text):
        return None  # 3D, H323, mp3: not spelled as written
    return " ".join(out) or None
