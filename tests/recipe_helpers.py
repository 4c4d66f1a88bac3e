"""Shared by the recipe tests: flite speech for fixture corpora, running a recipe's shell script, and checking the
data directory it wrote against the plugin (task, dataset, real fbank frame counts, the validate command)."""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List

import numpy as np
import soundfile as sf

from fairseq_smoe.data.manifest import MANIFEST_COLUMNS
from fixture_corpus import _flite

REPO = Path(__file__).resolve().parents[1]


def say(text: str, voice: str, cache_dir: Path) -> np.ndarray:
    """16 kHz float32 speech of ``text`` by a flite voice (cached across the session)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "say.wav"
        _flite(voice, text, out, cache_dir)
        wav, sr = sf.read(out, dtype="float32")
    assert sr == 16000 and wav.ndim == 1
    return wav


def run_recipe(corpus: str, *args, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """``recipes/<corpus>/prep.sh ARGS`` with this interpreter; fails the test with its output if it fails."""
    env = dict(os.environ, PYTHON=sys.executable)
    cmd = ["bash", str(REPO / "recipes" / corpus / "prep.sh"), *map(str, args)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **popen)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stderr[-4000:]}")
    return res


def read_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        assert reader.fieldnames == MANIFEST_COLUMNS, (path, reader.fieldnames)
        return list(reader)


def manifests(out_dir: Path) -> Dict[str, List[Dict[str, str]]]:
    return {p.stem: read_rows(p) for p in sorted(Path(out_dir).glob("*.tsv"))}


def load_split(out_dir: Path, split: str):
    """The split as the plugin's task loads it for training."""
    from fairseq_smoe.tasks.speech_to_text_smoe import SpeechToTextSMoETask

    parser = argparse.ArgumentParser()
    SpeechToTextSMoETask.add_args(parser)
    args = parser.parse_args([str(out_dir)])
    args.seed = 1
    task = SpeechToTextSMoETask.setup_task(args)
    task.load_dataset(split)
    return task, task.datasets[split]


@contextmanager
def one_torch_thread():
    """Tiny tensors on a shared 2-core machine: intra-op threads only contend (10x slower under load)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@one_torch_thread()
def check_frames_and_routes(out_dir: Path, split: str) -> int:
    """Every row's n_frames equals the fbank frames the dataset computes; bandwidth column = encoder route."""
    task, ds = load_split(out_dir, split)
    rows = read_rows(Path(out_dir) / f"{split}.tsv")
    assert len(ds) == len(rows)
    for i in range(len(ds)):
        item = ds[i]
        assert item.source.shape == (int(rows[i]["n_frames"]), 80), (rows[i]["id"], item.source.shape)
        assert ds.bandwidths[i] == rows[i]["bandwidth"]
        prefix = task.target_dictionary.string(item.target[:2])
        guide = "<transcribe>" if rows[i]["task"] == "asr" else "<translate>"
        assert prefix == f"{guide} <lang:{rows[i]['tgt_lang']}>", (rows[i]["id"], prefix)
    return len(ds)


def validate(out_dir: Path) -> int:
    """``python -m fairseq_smoe.cli.validate --check-audio`` (in-process) on the split manifests, then on the
    per-task/bandwidth slices (a slice repeats its split's ids, so the two groups are checked apart)."""
    from fairseq_smoe.cli import validate as v

    summary = json.loads((Path(out_dir) / "prep.json").read_text())["manifests"]
    tsvs = sorted(Path(out_dir).glob("*.tsv"))
    assert sorted(p.stem for p in tsvs) == sorted(summary)
    splits = [p for p in tsvs if p.stem in _splits(summary)]
    slices = [p for p in tsvs if p not in splits]
    return max(v.main([*map(str, group), "--check-audio"]) for group in (splits, slices))


def _splits(summary) -> set:
    """Split manifests are the names no other manifest name extends with '_<task>_<lang>_<bw>'."""
    return {n for n in summary if not any(m != n and n.startswith(m + "_") for m in summary)}


def tree_state(out_dir: Path) -> Dict[str, int]:
    """Modification times (ns) of every file under ``out_dir``, to show a rerun rewrote no audio."""
    return {str(p.relative_to(out_dir)): p.stat().st_mtime_ns for p in Path(out_dir).rglob("*") if p.is_file()}


# (English, German, Spanish) for fixture corpora; flite speaks the English
SENTENCES = [
    ("the cat sits on the mat", "die katze sitzt auf der matte", "el gato se sienta en la alfombra"),
    ("the dog runs in the park", "der hund läuft im park", "el perro corre en el parque"),
    ("i like green apples", "ich mag grüne äpfel", "me gustan las manzanas verdes"),
    ("she reads a book every night", "sie liest jeden abend ein buch", "ella lee un libro cada noche"),
    ("we eat bread and cheese", "wir essen brot und käse", "comemos pan y queso"),
    ("the sun is hot today", "die sonne ist heute heiß", "el sol está caliente hoy"),
    ("my house is very small", "mein haus ist sehr klein", "mi casa es muy pequeña"),
    ("he drinks cold water", "er trinkt kaltes wasser", "él bebe agua fría"),
]
LANG_COLUMN = {"en": 0, "de": 1, "es": 2}


@one_torch_thread()
def train_step(out_dir: Path, split: str):
    """One forward/backward of ``s2t_encdec_smoe_xs`` on a mixed batch holding one utterance of every (encoder
    route, decoder route) pair of the split; returns the loss and, per expert layer, which experts got a gradient."""
    import torch
    import torch.nn.functional as F

    from fairseq_smoe.cli import params
    from fairseq_smoe.modules.expert_layer import ExpertLinear

    torch.manual_seed(0)
    task, ds = load_split(out_dir, split)
    arch = "s2t_encdec_smoe_xs"
    model = params.ARCH_MODEL_REGISTRY[arch].build_model(params.model_args(arch, task.routing_table), task)
    first = {}
    for i in range(len(ds)):
        first.setdefault((int(ds.encoder_routes[i]), int(ds.decoder_routes[i])), i)
    batch = ds.collater([ds[i] for i in first.values()])
    out = model(**batch["net_input"])
    lprobs = model.get_normalized_probs(out, log_probs=True)
    loss = F.nll_loss(lprobs.view(-1, lprobs.size(-1)), batch["target"].view(-1),
                      ignore_index=task.target_dictionary.pad())
    loss.backward()
    used = [[bool(m.weight.grad[e].abs().sum() > 0) for e in range(m.num_experts)]
            for m in model.modules() if isinstance(m, ExpertLinear)]
    return loss.item(), used
