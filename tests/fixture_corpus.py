"""A tiny, real English speech corpus (ASR + en->es ST, NB + WB) synthesized with flite, for end-to-end tests.

WB audio is flite's 16 kHz speech; its NB twin goes through :func:`fairseq_smoe.data.audio.telephone_channel` and is
stored at 8 kHz. Every clip gives four train rows (asr/st x wb/nb). Dev and test use held-out speakers.
Building is deterministic and takes a few seconds; ``cache_dir`` keeps flite's output for later builds.
"""

import csv
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import soundfile as sf
import torch
import yaml

from fairseq_smoe.data import audio
from fairseq_smoe.data.vocab import build_vocab

# (English source text, Spanish translation)
SENTENCES: List[Tuple[str, str]] = [
    ("the cat sits on the mat", "el gato se sienta en la alfombra"),
    ("the dog runs in the park", "el perro corre en el parque"),
    ("i like green apples", "me gustan las manzanas verdes"),
    ("she reads a book every night", "ella lee un libro cada noche"),
    ("we eat bread and cheese", "comemos pan y queso"),
    ("the sun is hot today", "el sol está caliente hoy"),
    ("my house is very small", "mi casa es muy pequeña"),
    ("he drinks cold water", "él bebe agua fría"),
    ("the children play in the garden", "los niños juegan en el jardín"),
    ("open the door please", "abre la puerta por favor"),
    ("the car is red", "el coche es rojo"),
    ("i have two brothers", "tengo dos hermanos"),
    ("the bird sings in the tree", "el pájaro canta en el árbol"),
    ("they live near the sea", "ellos viven cerca del mar"),
    ("the coffee is too hot", "el café está demasiado caliente"),
    ("where is the train station", "dónde está la estación de tren"),
    ("my mother cooks good food", "mi madre cocina buena comida"),
    ("the shop opens at nine", "la tienda abre a las nueve"),
    ("i want to learn spanish", "quiero aprender español"),
    ("the fish swims in the river", "el pez nada en el río"),
    ("it is raining in the city", "está lloviendo en la ciudad"),
    ("the teacher writes on the board", "el profesor escribe en la pizarra"),
    ("we walk to school", "caminamos a la escuela"),
    ("the milk is in the fridge", "la leche está en la nevera"),
    ("my friend has a black horse", "mi amigo tiene un caballo negro"),
    ("the baby sleeps all day", "el bebé duerme todo el día"),
    ("close the window", "cierra la ventana"),
    ("the moon is bright tonight", "la luna brilla esta noche"),
    ("i need a new phone", "necesito un teléfono nuevo"),
    ("the old man sits by the fire", "el anciano se sienta junto al fuego"),
    ("she sings a happy song", "ella canta una canción alegre"),
    ("the flowers are yellow", "las flores son amarillas"),
]

# flite 2.2's built-in 16 kHz voices (``flite -lv``); kal16 is a diphone voice, the others clustergen.
TRAIN_SPEAKERS = ("slt", "rms", "awb")
TEST_SPEAKERS = ("kal16",)

HEADER = ["id", "audio", "n_frames", "tgt_text", "speaker", "task", "src_lang", "tgt_lang", "bandwidth"]
TASKS = {"asr": "en", "st": "es"}  # task -> target language
TEST_SETS = [f"test_{task}_{bw}" for task in TASKS for bw in ("nb", "wb")]


def have_flite() -> bool:
    return shutil.which("flite") is not None


def _flite(voice: str, text: str, out: Path, cache_dir: Optional[Path]) -> None:
    """Synthesize ``text`` into ``out``, through ``cache_dir`` when given."""
    cached = None
    if cache_dir is not None:
        key = hashlib.sha1(f"{voice}\n{text}".encode()).hexdigest()[:16]
        cached = cache_dir / f"{voice}_{key}.wav"
        if cached.exists():
            shutil.copyfile(cached, out)
            return
    target = cached or out
    fd, tmp = tempfile.mkstemp(suffix=".wav", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(["flite", "-voice", voice, "-t", text, "-o", tmp], check=True, capture_output=True)
        os.replace(tmp, target)  # atomic, so concurrent builds never see half a file
    finally:
        Path(tmp).unlink(missing_ok=True)
    if cached is not None:
        shutil.copyfile(cached, out)


def _make_clip(voice: str, text: str, wb_path: Path, nb_path: Path, cache_dir: Optional[Path]) -> Dict[str, int]:
    """WB wav from flite plus its 8 kHz telephone copy; returns the fbank frame counts and durations."""
    _flite(voice, text, wb_path, cache_dir)
    wav, sr = sf.read(wb_path, dtype="float32")
    if sr != audio.TARGET_SAMPLE_RATE or wav.ndim != 1:
        raise RuntimeError(f"{wb_path}: flite voice {voice} gave {sr} Hz, {wav.ndim}-D audio; need 16 kHz mono")
    nb = audio.telephone_channel(wav, sr)
    sf.write(nb_path, nb, 8000, subtype="PCM_16")
    return {
        "wb": audio.num_fbank_frames(len(wav)),
        "nb": audio.num_fbank_frames(len(audio.resample(nb, 8000))),
        "wb_samples": len(wav),
        "nb_samples": len(nb),
    }


def _write_manifest(path: Path, rows: List[dict], bandwidth_column: bool) -> None:
    header = HEADER if bandwidth_column else HEADER[:-1]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, header, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE,
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def make_corpus(
    out_dir: Path,
    n_train_sentences: int = len(SENTENCES),
    n_dev_sentences: int = 4,
    n_test_sentences: int = 8,
    train_speakers: Sequence[str] = TRAIN_SPEAKERS,
    test_speakers: Sequence[str] = TEST_SPEAKERS,
    vocab_size: int = 200,
    bandwidth_column: bool = True,
    cache_dir: Optional[Path] = None,
    workers: int = 4,
) -> dict:
    """Write wavs, manifests (train, dev, test_{asr,st}_{nb,wb}), SentencePiece vocab and config.yaml to ``out_dir``.

    Train uses the first ``n_train_sentences`` sentences by ``train_speakers``; dev and test reuse the first
    sentences, spoken by ``test_speakers``. Returns paths, row counts and audio durations.
    """
    if not have_flite():
        raise RuntimeError("flite is not installed (apt-get install flite)")
    if not 1 <= n_train_sentences <= len(SENTENCES):
        raise ValueError(f"n_train_sentences must be in 1..{len(SENTENCES)}")
    if max(n_dev_sentences, n_test_sentences) > len(SENTENCES):
        raise ValueError(f"at most {len(SENTENCES)} dev/test sentences")
    start = time.monotonic()
    out_dir = Path(out_dir)
    for sub in ("16k", "8k"):
        (out_dir / "wav" / sub).mkdir(parents=True, exist_ok=True)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache_dir = Path(cache_dir)

    n_eval = max(n_dev_sentences, n_test_sentences)
    clips = [(spk, i) for spk in train_speakers for i in range(n_train_sentences)]
    clips += [(spk, i) for spk in test_speakers for i in range(n_eval)]

    def rel(spk: str, i: int, bw: str) -> str:
        return f"wav/{'16k' if bw == 'wb' else '8k'}/{spk}_{i:03d}.wav"

    def job(clip):
        spk, i = clip
        return _make_clip(spk, SENTENCES[i][0], out_dir / rel(spk, i, "wb"), out_dir / rel(spk, i, "nb"), cache_dir)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny DSP calls in parallel: intra-op threads only contend
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            info = dict(zip(clips, pool.map(job, clips)))
    finally:
        torch.set_num_threads(threads)

    def rows(speakers, n, tasks=tuple(TASKS), bandwidths=("wb", "nb")):
        out = []
        for spk in speakers:
            for i in range(n):
                for task in tasks:
                    tgt_lang = TASKS[task]
                    text = SENTENCES[i][0 if task == "asr" else 1]
                    for bw in bandwidths:
                        out.append({
                            "id": f"{spk}_{i:03d}_{task}_{bw}", "audio": rel(spk, i, bw),
                            "n_frames": info[spk, i][bw], "tgt_text": text, "speaker": spk, "task": task,
                            "src_lang": "en", "tgt_lang": tgt_lang, "bandwidth": bw,
                        })
        return out

    splits = {"train": rows(train_speakers, n_train_sentences), "dev": rows(test_speakers, n_dev_sentences)}
    for name in TEST_SETS:
        _, task, bw = name.split("_")
        splits[name] = rows(test_speakers, n_test_sentences, tasks=(task,), bandwidths=(bw,))
    manifests = {}
    for name, split_rows in splits.items():
        manifests[name] = out_dir / f"{name}.tsv"
        _write_manifest(manifests[name], split_rows, bandwidth_column)

    train_texts = [t for en, es in SENTENCES[:n_train_sentences] for t in (en, es)]
    vocab_cfg = build_vocab(train_texts, str(out_dir), langs=list(TASKS.values()), vocab_size=vocab_size)
    config = {
        "input_feat_per_channel": 80,
        **vocab_cfg,
        "transforms": {"*": ["utterance_cmvn"], "_train": ["utterance_cmvn", "specaugment"]},
        "specaugment": {
            "freq_mask_F": 8, "freq_mask_N": 1, "time_mask_T": 10, "time_mask_N": 1, "time_mask_p": 0.2,
            "time_wrap_W": 0,
        },
        "utterance_cmvn": {"norm_means": True, "norm_vars": True},
        "smoe": {"encoder_routes": ["wb", "nb"], "decoder_routes": ["transcribe", "translate"]},
    }
    config_path = out_dir / "config.yaml"
    with open(config_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False, allow_unicode=True)

    return {
        "root": out_dir,
        "config": config_path,
        "manifests": manifests,
        "rows": {name: len(r) for name, r in splits.items()},
        "clips": len(clips),
        "seconds": {
            "wb": sum(v["wb_samples"] for v in info.values()) / audio.TARGET_SAMPLE_RATE,
            "nb": sum(v["nb_samples"] for v in info.values()) / 8000,
        },
        "train_speakers": list(train_speakers),
        "test_speakers": list(test_speakers),
        "vocab": {k: out_dir / v for k, v in (("model", vocab_cfg["bpe_tokenizer"]["sentencepiece_model"]),
                                              ("dict", vocab_cfg["vocab_filename"]))},
        "build_seconds": time.monotonic() - start,
    }
