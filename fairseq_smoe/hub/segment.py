"""Cut a long recording into speech segments the model can decode, with their start/end times.

Training utterances are seconds long; a recording of minutes would exceed the model's source positions and its
attention cost. The speech/non-speech decision per 30 ms frame comes from WebRTC's voice-activity detector
(``webrtcvad``, PyPI ``webrtcvad-wheels``: a small C extension with wheels, no model download) when it is installed,
else from frame energy relative to the recording's own loudest and quietest frames. Either way the frame decisions
are smoothed the same way: speech runs closer than ``min_silence_s`` merge, runs shorter than ``min_speech_s`` are
dropped, each run is widened by ``pad_s`` (never past the middle of the silence to its neighbour), and a run longer
than ``max_segment_s`` is split at its quietest frames. Last, a segment's ends are moved in past digital silence
(samples exactly 0: an edited or padded recording): it carries nothing, and its fbank frames (the log floor) would
skew the per-utterance CMVN of the segment.
"""

import importlib.util
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

FRAME_MS = 30  # webrtcvad takes 10, 20 or 30 ms frames; 30 is its steadiest
VAD_METHODS = ("auto", "webrtc", "energy")


@dataclass
class Segment:
    """One piece of a recording, in seconds from its start (``text`` filled in after decoding)."""

    start: float
    end: float
    text: Optional[str] = None

    @property
    def duration(self) -> float:
        return self.end - self.start

    def to_dict(self) -> dict:
        return {"start": round(self.start, 3), "end": round(self.end, 3), "text": self.text}


def have_webrtcvad() -> bool:
    return importlib.util.find_spec("webrtcvad") is not None


def _frames(wav: np.ndarray, frame: int) -> np.ndarray:
    n = len(wav) // frame
    return wav[: n * frame].reshape(n, frame)


def webrtc_speech_frames(wav: np.ndarray, sr: int, aggressiveness: int = 3) -> np.ndarray:
    """WebRTC VAD's speech flag per 30 ms frame (``sr`` one of 8, 16, 32, 48 kHz)."""
    import webrtcvad

    if sr not in (8000, 16000, 32000, 48000):
        raise ValueError(f"webrtcvad takes 8/16/32/48 kHz audio, got {sr} Hz")
    vad = webrtcvad.Vad(aggressiveness)
    pcm = (np.clip(wav, -1.0, 1.0) * 32767.0).astype("<i2")
    frames = _frames(pcm, sr * FRAME_MS // 1000)
    return np.array([vad.is_speech(f.tobytes(), sr) for f in frames], dtype=bool)


def frame_energy_db(wav: np.ndarray, sr: int) -> np.ndarray:
    frames = _frames(wav.astype(np.float64), sr * FRAME_MS // 1000)
    return 10.0 * np.log10(np.maximum((frames ** 2).mean(axis=1), 1e-12))


def energy_speech_frames(wav: np.ndarray, sr: int, threshold_db: Optional[float] = None) -> np.ndarray:
    """Frames louder than a threshold set between the recording's noise floor and its speech level.

    The floor is the 10th percentile of frame energies and the speech level the 95th; the threshold sits at 30%
    of the way from one to the other, and at least 15 dB above the floor, so steady background noise stays
    silence. ``threshold_db`` (dBFS) fixes it instead.
    """
    energy = frame_energy_db(wav, sr)
    if energy.size == 0:
        return np.zeros(0, dtype=bool)
    if threshold_db is None:
        floor, loud = np.percentile(energy, 10), np.percentile(energy, 95)
        threshold_db = max(floor + 0.3 * (loud - floor), floor + 15.0)
    return energy > threshold_db


def _runs(flags: np.ndarray) -> List[List[int]]:
    """[start, end) frame runs of True."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return [[int(a), int(b)] for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]


def _zero_runs(x: np.ndarray, min_run: int) -> List[List[int]]:
    return [r for r in _runs(x == 0) if r[1] - r[0] >= min_run]


def _last_zero_run_end(x: np.ndarray, min_run: int) -> Optional[int]:
    runs = _zero_runs(x, min_run)
    return runs[-1][1] if runs else None


def _first_zero_run_start(x: np.ndarray, min_run: int) -> Optional[int]:
    runs = _zero_runs(x, min_run)
    return runs[0][0] if runs else None


def _split_long(run, energy: np.ndarray, max_frames: int) -> List[List[int]]:
    """Split a run longer than ``max_frames`` at its quietest frame in the middle half, recursively."""
    a, b = run
    if b - a <= max_frames:
        return [run]
    lo, hi = a + (b - a) // 4, a + 3 * (b - a) // 4
    cut = lo + int(np.argmin(energy[lo:hi])) if hi > lo else (a + b) // 2
    return _split_long([a, cut], energy, max_frames) + _split_long([cut, b], energy, max_frames)


def speech_segments(
    wav: np.ndarray,
    sr: int,
    method: str = "auto",
    aggressiveness: int = 3,
    min_silence_s: float = 0.3,
    min_speech_s: float = 0.25,
    pad_s: float = 0.2,
    max_segment_s: float = 20.0,
    energy_threshold_db: Optional[float] = None,
    min_digital_silence_s: float = 0.01,
) -> List[Segment]:
    """Speech segments of ``wav`` (mono float in [-1, 1]) in time order; empty when nothing is speech.

    ``method``: ``webrtc`` (needs ``webrtcvad``), ``energy``, or ``auto`` (webrtc when installed, else energy).
    """
    if method not in VAD_METHODS:
        raise ValueError(f"VAD method must be one of {VAD_METHODS}, got {method!r}")
    if method == "webrtc" and not have_webrtcvad():
        raise ImportError("VAD method 'webrtc' needs webrtcvad: pip install webrtcvad-wheels (or use 'energy')")
    if method == "auto":
        method = "webrtc" if have_webrtcvad() else "energy"
    wav = np.asarray(wav, dtype=np.float32)
    if method == "webrtc":
        flags = webrtc_speech_frames(wav, sr, aggressiveness)
    else:
        flags = energy_speech_frames(wav, sr, energy_threshold_db)
    frame_s = FRAME_MS / 1000.0
    runs = _runs(flags)
    merged: List[List[int]] = []
    for run in runs:
        if merged and (run[0] - merged[-1][1]) * frame_s < min_silence_s:
            merged[-1][1] = run[1]
        else:
            merged.append(run)
    merged = [r for r in merged if (r[1] - r[0]) * frame_s >= min_speech_s]
    energy = frame_energy_db(wav, sr)
    max_frames = max(1, int(max_segment_s / frame_s))
    pieces = [p for r in merged for p in _split_long(r, energy, max_frames)]
    total = len(wav) / sr
    min_zero_run = max(1, int(min_digital_silence_s * sr))
    segments = []
    for i, (a, b) in enumerate(pieces):
        start, end = a * frame_s, b * frame_s
        # widen by pad_s, but only up to the middle of the gap to the neighbouring piece
        left = 0.0 if i == 0 else (pieces[i - 1][1] * frame_s + start) / 2
        right = total if i == len(pieces) - 1 else (end + pieces[i + 1][0] * frame_s) / 2
        s0, s1 = int(round(max(left, start - pad_s) * sr)), int(round(min(right, end + pad_s) * sr))
        # digital silence in the gap delimits the utterance exactly: reach out to it, then in past it
        lo, hi = int(round(left * sr)), int(round(right * sr))
        z0 = _last_zero_run_end(wav[lo:int(round(start * sr))], min_zero_run)
        if z0 is not None:
            s0 = lo + z0
        z1 = _first_zero_run_start(wav[int(round(end * sr)):hi], min_zero_run)
        if z1 is not None:
            s1 = int(round(end * sr)) + z1
        nonzero = np.flatnonzero(wav[s0:s1])
        if nonzero.size:
            s0, s1 = s0 + int(nonzero[0]), s0 + int(nonzero[-1]) + 1
        segments.append(Segment(s0 / sr, s1 / sr))
    return segments
