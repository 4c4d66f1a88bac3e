"""Long recordings: a 2-minute file built from the fixture corpus' utterances, separated by silences, is cut by voice
activity into one segment per utterance, in order, each within 0.3 s of where the utterance lies, and each segment
decodes to the text its utterance gives alone.

The utterances are flite's clips with their digital silence (exact zeros at the ends) trimmed, so "the utterance"
is a well-defined span of the recording. "Alone" is taken two ways: one input per batch on both sides
(``max_sentences=1``: the utterance decoded by itself), and the whole list of utterances in one call against the
recording in one call (the same batches: fairseq's convolutional subsampler lets a batch's padding reach the last
frames of the shorter rows, so a tiny model's beam can differ between a row padded in a batch and the same row
alone).
"""

import numpy as np
import pytest
import soundfile as sf

from hub_model import BEAM, MAX_LEN_B

from fairseq_smoe.hub import segment as seg

SR = 16000
LENGTH_S = 120.0
TOLERANCE_S = 0.3


def build_recording(corpus, noise_rms: float = 0.0, seed: int = 0):
    """(recording, utterances, [(start, end)] in seconds): WB utterances of the corpus, 0.8-1.6 s gaps, 2 minutes."""
    rng = np.random.default_rng(seed)
    clips = sorted((corpus / "wav" / "16k").glob("*.wav"))

    def gap(seconds):
        return (rng.standard_normal(int(seconds * SR)) * noise_rms).astype(np.float32)

    parts, utterances, truth = [gap(1.0)], [], []
    t = len(parts[0])
    for clip in clips:
        wav = np.trim_zeros(sf.read(clip, dtype="float32")[0])
        pause = gap(rng.uniform(0.8, 1.6))
        if (t + len(wav) + len(pause)) / SR > LENGTH_S - 1.0:
            break
        utterances.append(wav)
        truth.append((t / SR, (t + len(wav)) / SR))
        parts += [wav, pause]
        t += len(wav) + len(pause)
    parts.append(gap((int(LENGTH_S * SR) - t) / SR + 0.5 / SR))
    recording = np.concatenate(parts)
    assert len(recording) == int(LENGTH_S * SR) and len(utterances) >= 30
    return recording, utterances, truth


def assert_boundaries(segments, truth):
    assert len(segments) == len(truth)
    starts = [s.start for s in segments]
    assert starts == sorted(starts)
    for i, (s, (a, b)) in enumerate(zip(segments, truth)):
        assert abs(s.start - a) <= TOLERANCE_S and abs(s.end - b) <= TOLERANCE_S, (i, s, (a, b))


@pytest.mark.parametrize("vad", ["energy", "webrtc"])
def test_two_minute_recording_segments_and_their_texts(trained, hub, vad):
    if vad == "webrtc" and not seg.have_webrtcvad():
        pytest.skip("webrtcvad is not installed (pip install webrtcvad-wheels); the energy detector is tested")
    recording, utterances, truth = build_recording(trained["corpus"])
    opts = dict(beam=BEAM, max_len_b=MAX_LEN_B, vad=vad)

    alone = [hub.transcribe((u, SR), **opts).text for u in utterances]
    result = hub.transcribe((recording, SR), max_sentences=1, **opts)
    assert result.duration == pytest.approx(LENGTH_S)
    assert_boundaries(result.segments, truth)
    assert [s.text for s in result.segments] == alone
    assert result.text == " ".join(t for t in alone if t)
    assert result.bandwidth == "wb" and result.task == "asr"

    batched = hub.transcribe((recording, SR), **opts)  # all segments in as few batches as max_tokens allows
    together = [r.text for r in hub.transcribe([(u, SR) for u in utterances], **opts)]
    assert [s.text for s in batched.segments] == together
    assert [(s.start, s.end) for s in batched.segments] == [(s.start, s.end) for s in result.segments]


@pytest.mark.parametrize("vad", ["energy", "webrtc"])
def test_segments_in_background_noise(trained, vad):
    """Gaps of steady noise (-70 dBFS) instead of digital silence: same count, order and boundaries."""
    if vad == "webrtc" and not seg.have_webrtcvad():
        pytest.skip("webrtcvad is not installed")
    recording, _, truth = build_recording(trained["corpus"], noise_rms=3e-4, seed=1)
    assert_boundaries(seg.speech_segments(recording, SR, method=vad), truth)


def test_nb_recording_at_8k(trained, hub):
    """An 8 kHz telephone recording: routed nb for every segment, segments where the utterances are."""
    from fairseq_smoe.data.audio import resample, telephone_channel

    recording, _, truth = build_recording(trained["corpus"])
    nb = telephone_channel(recording, SR)
    result = hub.transcribe((nb, 8000), beam=1, max_len_b=MAX_LEN_B)
    assert result.bandwidth == "nb" and result.duration == pytest.approx(LENGTH_S, abs=1e-3)
    assert_boundaries(result.segments, truth)
    assert all(isinstance(s.text, str) for s in result.segments)
    assert len(resample(nb, 8000)) == len(recording)


def test_segmenter_rules():
    """Merging across short pauses, dropping blips, splitting over-long speech, silence -> no segments."""
    rng = np.random.default_rng(0)
    tone = lambda s: (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(s * SR)) / SR)).astype(np.float32)  # noqa: E731
    zeros = lambda s: np.zeros(int(s * SR), dtype=np.float32)  # noqa: E731
    noise = lambda s: (rng.standard_normal(int(s * SR)) * 1e-4).astype(np.float32)  # noqa: E731
    # 1 s tone, 0.1 s pause (merged), 1 s tone, 1 s silence, 0.06 s blip (dropped), 1 s silence, 1 s tone
    x = np.concatenate([noise(1), tone(1), noise(0.1), tone(1), noise(1), tone(0.06), noise(1), tone(1), noise(1)])
    got = seg.speech_segments(x, SR, method="energy")
    assert len(got) == 2
    assert got[0].start == pytest.approx(1.0 - 0.25, abs=0.06) and got[0].end == pytest.approx(3.1 + 0.25, abs=0.06)
    long = np.concatenate([noise(5), tone(25), noise(5)])  # the energy rule needs some silence to find the floor
    pieces = seg.speech_segments(long, SR, method="energy", max_segment_s=10)
    assert len(pieces) >= 3 and max(p.duration for p in pieces) <= 10 + 2 * 0.2
    assert pieces[0].start == pytest.approx(5 - 0.2, abs=0.06) and pieces[-1].end == pytest.approx(30.2, abs=0.06)
    assert all(a.end <= b.start for a, b in zip(pieces, pieces[1:]))
    assert seg.speech_segments(zeros(3), SR, method="energy") == []
    with pytest.raises(ValueError, match="VAD method"):
        seg.speech_segments(x, SR, method="silero")


def test_auto_falls_back_to_energy_without_webrtcvad(trained, monkeypatch):
    """Without webrtcvad (a machine that did not install webrtcvad-wheels), ``auto`` is the energy detector, and
    asking for ``webrtc`` says what to install."""
    recording, _, truth = build_recording(trained["corpus"], noise_rms=3e-4, seed=2)
    monkeypatch.setattr(seg, "have_webrtcvad", lambda: False)
    auto = seg.speech_segments(recording, SR, method="auto")
    assert auto == seg.speech_segments(recording, SR, method="energy")
    assert_boundaries(auto, truth)
    with pytest.raises(ImportError, match="pip install webrtcvad-wheels"):
        seg.speech_segments(recording, SR, method="webrtc")
