"""Real fairseq checkpoints load under torch's ``weights_only`` unpickler once ``fairseq_smoe`` is imported, and
nothing beyond what they hold is allowed.

The checkpoints come from a few updates of a tiny ``translation --eval-bleu`` transformer, which stores
``argparse.Namespace`` in ``cfg`` and numpy BLEU counts in ``extra_state["metrics"]``, as our task does, plus a
``--restore-file`` resume, which goes through ``load_checkpoint_to_cpu`` in the training process.
"""

import argparse
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fairseq_smoe  # noqa: F401  (registers the allow-list)
from fairseq import checkpoint_utils
from fairseq_smoe.checkpoint.safety import FAIRSEQ_CHECKPOINT_GLOBALS, UnsafeCheckpointError, register

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "fairseq_smoe"

TRAIN_ARGS = [
    "--task", "translation", "--arch", "transformer",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--optimizer", "adam", "--lr", "1e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "2",
    "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--max-tokens", "100",
    "--save-interval-updates", "1",
    "--eval-bleu", "--eval-bleu-args", '{"beam": 1, "max_len_b": 10}',
    "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
    "--cpu", "--seed", "1", "--no-progress-bar", "--log-format", "simple", "--num-workers", "0",
    "--user-dir", str(PLUGIN),
]


def _run(module, *args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Binarized toy corpus and the checkpoints of a 2-update run and of a run resumed from it."""
    root = tmp_path_factory.mktemp("fairseq_toy")
    rng = random.Random(0)
    words = "the cat dog sat on mat a big small red blue house runs jumps".split()
    for split, n in (("train", 32), ("valid", 8)):
        sents = [[rng.choice(words) for _ in range(rng.randint(3, 8))] for _ in range(n)]
        (root / f"{split}.src").write_text("".join(" ".join(s) + "\n" for s in sents))
        (root / f"{split}.tgt").write_text("".join(" ".join(reversed(s)) + "\n" for s in sents))
    data = root / "bin"
    _run("fairseq_cli.preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", "train",
         "--validpref", "valid", "--destdir", str(data), "--joined-dictionary", "--workers", "1", cwd=root)
    _run("fairseq_cli.train", str(data), *TRAIN_ARGS, "--max-update", "2", "--save-dir", str(root / "run"),
         cwd=root)
    resumed = _run("fairseq_cli.train", str(data), *TRAIN_ARGS, "--max-update", "3", "--save-dir",
                   str(root / "resumed"), "--restore-file", str(root / "run" / "checkpoint_1_1.pt"), cwd=root)
    assert "Loaded checkpoint" in resumed.stdout + resumed.stderr
    return root


CHECKPOINTS = ["run/checkpoint_1_1.pt", "run/checkpoint_best.pt", "run/checkpoint_last.pt",
               "resumed/checkpoint_last.pt"]


def _name(entry):
    """The pickle name torch matches an allow-list entry against (an explicit name, or module.qualname)."""
    return entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"


@pytest.mark.parametrize("ckpt", CHECKPOINTS)
def test_fairseq_checkpoint_loads_weights_only(trained, ckpt):
    path = trained / ckpt
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert {"train_iterator", "val_loss", "metrics", "previous_training_time"} <= state["extra_state"].keys()
    assert state["last_optimizer_state"]["state"] and state["model"]
    assert torch.load(path, weights_only=True)["cfg"]["model"].arch == "transformer"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []


def test_checkpoint_needs_the_allow_list(trained):
    """Without the plugin torch refuses it: the checkpoints really hold what the allow-list is for."""
    path = trained / "run" / "checkpoint_last.pt"
    probe = f"import torch; torch.load({str(path)!r}, weights_only=True)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "argparse.Namespace" in proc.stderr
    state = torch.load(path, weights_only=True)
    counts = [m for m in state["extra_state"]["metrics"]["valid"] if m[1] == "_bleu_counts"]
    assert counts and type(counts[0][3]["sum"]).__module__ == "numpy"


def test_load_model_ensemble(trained):
    models, cfg = checkpoint_utils.load_model_ensemble([str(trained / "resumed" / "checkpoint_last.pt")])
    assert len(models) == 1 and cfg.model.encoder_embed_dim == 16


class Trojan:
    """A class no allow-list names: unpickling it would run its ``__setstate__``."""

    def __init__(self, marker):
        self.marker = marker

    def __setstate__(self, state):
        Path(state["marker"]).touch()


class Reducer:
    """Pickles as a call to ``fn(*args)``, the classic code-execution payload."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload", ["os.system", "builtins.open", "class"])
def test_malicious_checkpoint_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil, offending = {
        "os.system": (Reducer(os.system, f'mkdir "{marker}"'), f"{os.system.__module__}.system"),
        "builtins.open": (Reducer(open, str(marker), "w"), f"{open.__module__}.open"),
        "class": (Trojan(str(marker)), f"{__name__}.Trojan"),
    }[payload]
    path = tmp_path / "checkpoint_evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "cfg": None, "extra_state": {"x": evil}}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert isinstance(err.value, pickle.UnpicklingError)  # what torch raises, for callers that catch it
    message = str(err.value)
    assert message.startswith(f"{path}: refused to load") and offending in message
    assert f"python -m fairseq_smoe.cli.trust_checkpoint --trust {path}" in message
    assert not marker.exists()


def test_generate_refuses_a_malicious_checkpoint_with_a_clear_error(tmp_path, trained):
    """Through fairseq-generate, as a user meets it: one clear line, exit status 1, nothing executed."""
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint_evil.pt"
    state = torch.load(trained / "run" / "checkpoint_last.pt", weights_only=True)
    state["extra_state"]["x"] = Reducer(os.system, f'mkdir "{marker}"')
    torch.save(state, path)
    proc = subprocess.run([
        sys.executable, "-m", "fairseq_cli.generate", str(trained / "bin"), "--path", str(path),
        "--user-dir", str(PLUGIN), "--cpu", "--gen-subset", "valid",
    ], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1
    assert f"UnsafeCheckpointError: {path}: refused to load" in proc.stderr
    assert "posix.system" in proc.stderr or "os.system" in proc.stderr
    assert not marker.exists()


def test_trusted_legacy_checkpoint_is_converted_explicitly(tmp_path, trained):
    """An old-style checkpoint (cfg pickled as omegaconf DictConfig) is refused until the user converts it."""
    from omegaconf import OmegaConf

    state = torch.load(trained / "run" / "checkpoint_last.pt", weights_only=True)
    cfg = {k: (vars(v) if isinstance(v, argparse.Namespace) else v) for k, v in state["cfg"].items()}
    state["cfg"] = OmegaConf.create(cfg)
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy)
    with pytest.raises(UnsafeCheckpointError, match="omegaconf"):
        checkpoint_utils.load_checkpoint_to_cpu(str(legacy))

    converted = tmp_path / "converted.pt"
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.cli.trust_checkpoint", "--trust", str(legacy),
                           "--out", str(converted)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert isinstance(torch.load(converted, weights_only=True)["cfg"], dict)
    models, cfg = checkpoint_utils.load_model_ensemble([str(converted)])
    assert cfg.model.encoder_embed_dim == 16
    original = torch.load(trained / "run" / "checkpoint_last.pt", weights_only=True)["model"]
    assert all(torch.equal(models[0].state_dict()[k], v) for k, v in original.items())


def test_convert_refuses_a_missing_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.cli.trust_checkpoint", "--trust",
                           str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and f"{tmp_path / 'nope.pt'}: no such file" in proc.stderr
    assert not (tmp_path / "out.pt").exists()


def test_allow_list_is_exactly_what_checkpoints_hold():
    int64_dtype, float64_dtype = type(np.dtype(np.int64)), type(np.dtype(np.float64))
    assert {_name(e) for e in FAIRSEQ_CHECKPOINT_GLOBALS} == {
        "argparse.Namespace",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        f"{int64_dtype.__module__}.{int64_dtype.__qualname__}",
        f"{float64_dtype.__module__}.{float64_dtype.__qualname__}",  # float64 BLEU sums of older multi-process runs
    }
    objects = {e[0] if isinstance(e, tuple) else e for e in FAIRSEQ_CHECKPOINT_GLOBALS}
    assert not objects & {eval, exec, open, getattr, __import__, os.system, subprocess.Popen, pickle.loads, torch.load}


def test_register_is_idempotent_and_active():
    before = len(torch.serialization.get_safe_globals())
    register()
    register()
    safe = torch.serialization.get_safe_globals()
    assert len(safe) == before
    assert all(e in safe for e in FAIRSEQ_CHECKPOINT_GLOBALS)
