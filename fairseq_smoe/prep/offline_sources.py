"""Real human speech at both bandwidths: Debian's Asterisk core sound prompts (one speaker, Allison Smith).

``asterisk-core-sounds-en-wav`` holds each prompt as 8 kHz telephone audio and ``asterisk-core-sounds-en-g722`` the
same prompt as 16 kHz G.722 (raw 64 kbit/s, no header), so one recording gives a real NB and a real WB utterance.
Transcripts are in ``core-sounds-en.txt.gz`` (``name: text`` lines) and Spanish translations, matched by the prompt
name, in ``asterisk-core-sounds-es``'s ``core-sounds-es.txt.gz``. Licence: CC-BY-SA-3.0.
"""

import gzip
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

logger = logging.getLogger(__name__)

SOUNDS_DIR = "usr/share/asterisk/sounds/en_US_f_Allison"
EN_TEXTS = "usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
ES_TEXTS = "usr/share/doc/asterisk-core-sounds-es/core-sounds-es.txt.gz"
APT_PACKAGES = ("asterisk-core-sounds-en-wav", "asterisk-core-sounds-en-g722", "asterisk-core-sounds-en",
                "asterisk-core-sounds-es")
G722_RATE, G722_BITRATE = 16000, 64000
NON_SPEECH = ("silence/",)  # prompts whose "transcript" describes something that is not speech
_LINE = re.compile(r"^([A-Za-z0-9_.+-]+(?:/[A-Za-z0-9_.+-]+)*):\s*(.*)$")


@dataclass(frozen=True)
class Prompt:
    """One Asterisk prompt: its name (``digits/7``), texts and the two recordings."""

    name: str
    en: str
    es: Optional[str]
    nb_path: Path  # 8 kHz PCM wav
    wb_path: Path  # 16 kHz G.722


def read_prompt_texts(path: Path) -> Dict[str, str]:
    """``{prompt name: text}`` from a ``core-sounds-xx.txt.gz`` (``;`` comments and blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found (apt-get install {', '.join(APT_PACKAGES)}; if the package is installed, dpkg may be "
            "set to skip /usr/share/doc, as minimal container images are: see path-exclude in /etc/dpkg/dpkg.cfg.d/)")
    try:
        with gzip.open(path, "rt", encoding="utf-8", errors="strict") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    texts = {}
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"{path}:{lineno}: not a 'name: text' line: {line[:80]!r}")
        texts[m.group(1)] = m.group(2).strip()
    if not texts:
        raise ValueError(f"{path}: no prompts")
    return texts


def find_prompts(root: Path = Path("/")) -> List[Prompt]:
    """Prompts that have an English transcript and both recordings under ``root`` (``/`` for the installed
    packages, or a folder holding the same layout)."""
    root = Path(root)
    sounds = root / SOUNDS_DIR
    if not sounds.is_dir():
        raise FileNotFoundError(f"{sounds}: not found (apt-get install {', '.join(APT_PACKAGES)})")
    en = read_prompt_texts(root / EN_TEXTS)
    es_path = root / ES_TEXTS
    es = read_prompt_texts(es_path) if es_path.is_file() else {}
    if not es:
        logger.warning(f"{es_path}: not found; no Spanish translations for the real-speech ST test")
    prompts, missing = [], 0
    for name in sorted(en):
        if name.startswith(NON_SPEECH):
            continue
        nb, wb = sounds / f"{name}.wav", sounds / f"{name}.g722"
        if not (nb.is_file() and wb.is_file()):
            missing += 1
            continue
        prompts.append(Prompt(name, en[name], es.get(name), nb, wb))
    logger.info(f"Asterisk prompts: {len(prompts)} with transcript, 8 kHz wav and G.722 "
                f"({missing} transcripts without both recordings, {sum(p.es is not None for p in prompts)} with Spanish)")
    if not prompts:
        raise ValueError(f"{sounds}: no prompt has a transcript in {root / EN_TEXTS} and both .wav and .g722 files")
    return prompts


def decode_g722(path: Path) -> np.ndarray:
    """16 kHz float32 audio of a raw 64 kbit/s G.722 file (PyPI ``G722``, the ITU reference codec)."""
    try:
        import G722
    except ImportError:
        raise ImportError("decoding Asterisk's .g722 prompts needs the PyPI package G722 (pip install G722; "
                          "scripts/setup.sh installs it)") from None
    data = Path(path).read_bytes()
    if not data:
        raise ValueError(f"{path}: empty G.722 file")
    pcm = G722.G722(G722_RATE, G722_BITRATE).decode(data)
    return np.asarray(pcm, dtype=np.float32) / 32768.0


def encode_g722(wav16k: np.ndarray) -> bytes:
    """Raw 64 kbit/s G.722 of 16 kHz float audio (to build test fixtures in the package's format)."""
    import G722

    pcm = np.clip(np.round(np.asarray(wav16k) * 32767.0), -32768, 32767).astype(np.int16)
    return bytes(G722.G722(G722_RATE, G722_BITRATE).encode(pcm))
