"""SIGKILL at any moment, rerun the same command: training resumes from the last complete checkpoint and ends with
the parameters of a run that was never interrupted; no checkpoint file is ever left half-written."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fairseq_smoe.checkpoint.atomic import atomic_copy

PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_smoe"
BIN = Path(sys.executable).parent
MAX_UPDATE = 30  # about one and a half epochs of the fixture corpus at --max-sentences 16


def train_cmd(data, save_dir):
    return [
        str(BIN / "fairseq-train"), str(data), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--arch", "s2t_encdec_smoe_xs", "--encoder-layers", "2",
        "--decoder-layers", "1", "--train-subset", "train", "--valid-subset", "dev",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5",
        "--clip-norm", "10", "--max-sentences", "16", "--max-update", str(MAX_UPDATE), "--seed", "7",
        "--save-dir", str(save_dir), "--save-interval-updates", "4", "--keep-interval-updates", "2",
        "--disable-validation", "--cpu", "--num-workers", "0", "--log-format", "simple", "--log-interval", "1",
    ]


ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def run_to_end(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def run_and_kill(cmd, cwd, trigger: str, delay: float = 0.0) -> str:
    """Start training and SIGKILL it ``delay`` seconds after its log shows ``trigger`` for the first time."""
    log_path = cwd / f"killed_{time.time_ns()}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            if trigger in log_path.read_text():
                time.sleep(delay)
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait()
    text = log_path.read_text()
    assert proc.returncode == -signal.SIGKILL, f"training ended before it could be killed:\n{text[-3000:]}"
    return text


def model_params(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(train_cmd(corpus_dir, work / "ckpt"), work)
    return model_params(work / "ckpt" / "checkpoint_last.pt")


def test_killed_three_times_then_rerun_matches_an_uninterrupted_run(corpus_dir, reference, tmp_path):
    save_dir = tmp_path / "ckpt"
    cmd = train_cmd(corpus_dir, save_dir)
    rng = random.Random(0)
    kills = [
        ("Preparing to save checkpoint", 0.0),  # in the middle of writing the first checkpoints
        ("Saved checkpoint", rng.uniform(0.0, 0.2)),  # just after a save
        (f"num_updates={MAX_UPDATE - 6}", 0.0),  # between two saves
    ]
    for trigger, delay in kills:
        run_and_kill(cmd, tmp_path, trigger, delay)
        last = save_dir / "checkpoint_last.pt"
        if last.exists():  # always whole: it loads
            state = torch.load(last, map_location="cpu", weights_only=True)
            assert 0 < state["optimizer_history"][-1]["num_updates"] < MAX_UPDATE
    log = run_to_end(cmd, tmp_path)
    assert "Loaded checkpoint" in log and f"num_updates={MAX_UPDATE}" in log
    assert not any(p.stat().st_size == 0 for p in save_dir.glob("*.pt"))
    resumed = model_params(save_dir / "checkpoint_last.pt")
    assert resumed.keys() == reference.keys()
    worst = max((resumed[k].float() - reference[k].float()).abs().max().item() for k in reference)
    assert worst < 1e-5, f"resumed parameters differ from the uninterrupted run by up to {worst}"


def test_a_killed_copy_never_leaves_a_partial_checkpoint(tmp_path):
    """SIGKILL a process in the middle of copying a 64 MB checkpoint: the destination is the old or the new file."""
    old, new, dst = tmp_path / "old.pt", tmp_path / "new.pt", tmp_path / "checkpoint_last.pt"
    old_bytes, new_bytes = b"o" * (64 << 20), b"n" * (64 << 20)
    old.write_bytes(old_bytes)
    new.write_bytes(new_bytes)
    atomic_copy(str(old), str(dst))
    code = (f"from fairseq_smoe.checkpoint.atomic import atomic_copy\n"
            f"while True: atomic_copy({str(new)!r}, {str(dst)!r}, overwrite=True); "
            f"atomic_copy({str(old)!r}, {str(dst)!r}, overwrite=True)\n")
    rng = random.Random(1)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=PLUGIN.parent)
        time.sleep(3 + rng.uniform(0, 1))  # import, then copies in flight
        proc.kill()
        proc.wait()
        data = dst.read_bytes()
        assert data == old_bytes or data == new_bytes, f"partial checkpoint: {len(data)} bytes"
    # a killed copy leaves at most one temporary file, which the next copy reuses
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] in ([], ["checkpoint_last.pt.tmp"])
    assert atomic_copy(str(old), str(dst), overwrite=False) is False  # fairseq's overwrite flag is honoured
