"""Audio in, 80-dim Kaldi fbank out, plus the bandwidth label the encoder is routed by.

fairseq's own waveform path imports ``torchaudio.sox_effects``, which torchaudio >= 2.9 no longer has, so reading
(soundfile), resampling (``torchaudio.functional.resample``) and fbank (``torchaudio.compliance.kaldi``) live here.
NB audio is upsampled to 16 kHz before features: both bandwidths share one front end, and only the encoder
experts see which one they got.
"""

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from ..routing import BANDWIDTHS, NB, WB  # noqa: F401  (the labels and their order are routing's)

TARGET_SAMPLE_RATE = 16000
NB_EDGE_HZ = 4000
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg"}
FEATURE_EXTENSIONS = {".npy"}
SUPPORTED_RATES = (8000, 48000)  # lowest and highest sample rate accepted (resampled to 16 kHz)


class AudioError(ValueError):
    """A source that cannot be used; the message names the file."""


@dataclass
class AudioRef:
    """Where a manifest's ``audio`` field points: a file, or a byte range of an uncompressed zip."""

    path: str
    offset: Optional[int] = None
    length: Optional[int] = None

    @property
    def is_slice(self) -> bool:
        return self.offset is not None

    def __str__(self):
        return f"{self.path}:{self.offset}:{self.length}" if self.is_slice else self.path


def resolve(field: str, root: Optional[str]) -> AudioRef:
    """Parse ``path`` or fairseq's ``zip_path:offset:length``; relative paths are taken from ``root``."""
    path, offset, length = field, None, None
    suffix = Path(field).suffix.lower()
    if suffix not in AUDIO_EXTENSIONS | FEATURE_EXTENSIONS:
        parts = field.rsplit(":", 2)
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            path, offset, length = parts[0], int(parts[1]), int(parts[2])
        else:
            raise AudioError(
                f"{field}: not a .wav/.flac/.ogg/.npy path nor a zip slice 'file.zip:offset:length'"
            )
    if root and not os.path.isabs(path):
        path = os.path.join(root, path)
    return AudioRef(path, offset, length)


def _read_bytes(ref: AudioRef) -> bytes:
    if not os.path.isfile(ref.path):
        raise AudioError(f"{ref}: file not found")
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        data = f.read(ref.length)
    if len(data) != ref.length:
        raise AudioError(f"{ref}: slice runs past the end of the file ({len(data)} of {ref.length} bytes)")
    return data


def _is_npy(data: bytes) -> bool:
    return data[:6] == b"\x93NUMPY"


def _open(ref: AudioRef):
    """A path or file object soundfile/numpy can read, and whether it holds .npy features."""
    if ref.is_slice:
        data = _read_bytes(ref)
        return io.BytesIO(data), _is_npy(data)
    if not os.path.isfile(ref.path):
        raise AudioError(f"{ref}: file not found")
    return ref.path, Path(ref.path).suffix.lower() == ".npy"


def sample_rate_of(ref: AudioRef) -> Optional[int]:
    """The file's sample rate from its header (no decoding); ``None`` for feature files."""
    import soundfile as sf

    src, is_npy = _open(ref)
    if is_npy:
        return None
    try:
        return int(sf.info(src).samplerate)
    except Exception as e:  # soundfile raises its own error types
        raise AudioError(f"{ref}: cannot read audio header ({e})") from None


def read_waveform(ref: AudioRef) -> Tuple[np.ndarray, int]:
    """Mono float32 waveform in [-1, 1] and its sample rate."""
    import soundfile as sf

    src, is_npy = _open(ref)
    if is_npy:
        raise AudioError(f"{ref}: holds features, not audio")
    try:
        wav, sr = sf.read(src, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{ref}: cannot decode audio ({e})") from None
    if wav.shape[1] != 1:
        raise AudioError(f"{ref}: {wav.shape[1]} channels; S-MoE expects mono audio (downmix it first)")
    if wav.shape[0] == 0:
        raise AudioError(f"{ref}: no samples")
    if not SUPPORTED_RATES[0] <= sr <= SUPPORTED_RATES[1]:
        raise AudioError(f"{ref}: sample rate {sr} Hz outside the supported {SUPPORTED_RATES[0]}-{SUPPORTED_RATES[1]} Hz")
    if not np.isfinite(wav).all():  # float WAVs can hold them; they would turn the loss into NaN
        raise AudioError(f"{ref}: samples contain NaN or inf")
    return wav[:, 0], int(sr)


def read_features(ref: AudioRef) -> np.ndarray:
    src, is_npy = _open(ref)
    if not is_npy:
        raise AudioError(f"{ref}: not a .npy feature file")
    try:
        feats = np.load(src, allow_pickle=False)
    except Exception as e:
        raise AudioError(f"{ref}: cannot load features ({e})") from None
    if feats.ndim != 2:
        raise AudioError(f"{ref}: features must be 2-D (frames x dims), got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise AudioError(f"{ref}: features contain NaN or inf")
    return feats.astype(np.float32, copy=False)


# Kaiser-windowed sinc, 16 zero crossings: images of 8 kHz audio upsampled to 16 kHz stay about 60 dB down
# (torchaudio's default Hann window of width 6 leaves them at about -25 dB, which puts fake energy above 4 kHz
# into the NB features and blurs spectral bandwidth detection).
RESAMPLE_KWARGS = dict(resampling_method="sinc_interp_kaiser", lowpass_filter_width=16, rolloff=0.945, beta=8.6)


def check_source(ref: AudioRef) -> int:
    """Decode a manifest's source fully; its number of fbank frames, or :class:`AudioError` if training would fail."""
    src, is_npy = _open(ref)
    if is_npy:
        return read_features(ref).shape[0]
    wav, sr = read_waveform(ref)
    frames = num_fbank_frames(int(round(len(wav) * TARGET_SAMPLE_RATE / sr)))
    if frames == 0:
        raise AudioError(f"{ref}: {len(wav) / sr * 1000:.1f} ms, shorter than one 25 ms analysis window")
    return frames


# n_frames written by other tools (another fbank framing, resampling rounding) may differ by a few frames
FRAME_TOLERANCE = (3, 0.05)


def check_frames(ref, frames: int, expected: int) -> None:
    """Raise :class:`AudioError` when a source decodes to clearly fewer/more frames than its manifest row says.

    A truncated WAV decodes without error (libsndfile reads what is there), so this is how it is caught.
    """
    if abs(frames - expected) > max(FRAME_TOLERANCE[0], FRAME_TOLERANCE[1] * expected):
        raise AudioError(
            f"{ref}: {frames} fbank frames, but the manifest says n_frames={expected}: truncated or replaced file? "
            f"(if the audio is right, recompute n_frames)"
        )


def resample(wav: np.ndarray, sr: int, target: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    if sr == target:
        return wav
    import torchaudio.functional as AF

    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    return AF.resample(x, sr, target, **RESAMPLE_KWARGS).numpy()


def fbank(wav16k: np.ndarray, num_mel_bins: int = 80) -> np.ndarray:
    """Kaldi-compatible log-mel filterbank (25 ms window, 10 ms shift) of 16 kHz audio, as fairseq computes it."""
    import torchaudio.compliance.kaldi as kaldi

    if num_fbank_frames(len(wav16k)) == 0:  # kaldi.fbank asserts on audio shorter than one window
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(wav16k)).unsqueeze(0) * 32768.0  # kaldi expects 16-bit scale
    return kaldi.fbank(x, num_mel_bins=num_mel_bins, sample_frequency=TARGET_SAMPLE_RATE).numpy()


def num_fbank_frames(num_samples_16k: int) -> int:
    """Frames :func:`fbank` gives for that many 16 kHz samples (the manifest's ``n_frames``)."""
    window, shift = 400, 160
    return 0 if num_samples_16k < window else 1 + (num_samples_16k - window) // shift


def bandwidth_from_rate(sr: int) -> str:
    """8 kHz (and anything below 16 kHz) is narrowband; 16 kHz and above is wideband."""
    return NB if sr < TARGET_SAMPLE_RATE else WB


def high_band_energy_db(wav: np.ndarray, sr: int) -> float:
    """Energy above 4 kHz relative to the total, in dB (very negative for band-limited speech)."""
    if sr <= 2 * NB_EDGE_HZ:
        return float("-inf")
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    n_fft = 512
    if x.numel() < n_fft:
        x = torch.nn.functional.pad(x, (0, n_fft - x.numel()))
    spec = torch.stft(x, n_fft, hop_length=n_fft // 2, window=torch.hann_window(n_fft), return_complex=True)
    power = spec.abs().pow(2).sum(dim=1)  # per frequency bin
    freqs = torch.linspace(0, sr / 2, power.numel())
    total = float(power.sum())
    if total <= 0:
        return float("-inf")
    high = float(power[freqs > NB_EDGE_HZ + 200].sum())
    return 10.0 * np.log10(max(high, 1e-30) / total)


def spectral_bandwidth(wav: np.ndarray, sr: int, threshold_db: float) -> str:
    """``nb`` when the energy above 4 kHz is below ``threshold_db`` of the total (e.g. NB stored at 16 kHz)."""
    return NB if high_band_energy_db(wav, sr) < threshold_db else WB


def telephone_channel(wav: np.ndarray, sr: int, mu_law: bool = True) -> np.ndarray:
    """Simulate a telephone line: 300-3400 Hz band-pass, 8 kHz, G.711 mu-law round trip. Returns 8 kHz audio."""
    import torchaudio.functional as AF

    x = torch.from_numpy(np.ascontiguousarray(resample(wav, sr, 8000), dtype=np.float32))
    x = AF.highpass_biquad(x, 8000, 300.0)
    x = AF.lowpass_biquad(x, 8000, 3400.0)
    x = AF.lowpass_biquad(x, 8000, 3400.0)
    x = x.clamp(-1.0, 1.0)
    if mu_law:
        x = AF.mu_law_decoding(AF.mu_law_encoding(x, 256), 256)
    return x.numpy().astype(np.float32)
