"""Multi-process training with experts that a batch does not use: no hang, no error, and the same parameters as a
single process that sees the same batches.

Two processes on CPU with gloo, launched by torchrun:
* torch's DistributedDataParallel (fairseq's ``--ddp-backend pytorch_ddp``, the GPU default) with
  ``find_unused_parameters=False``, each rank on another route pair, against one process summing both batches;
* ``fairseq-train`` itself (``--ddp-backend legacy_ddp``: fairseq hands pytorch_ddp a CUDA device id, which torch
  refuses for a CPU model) against one process with ``--update-freq 2``. Batches are homogeneous (one bandwidth and
  one task each, the default), so on every update each rank leaves one encoder and one decoder expert unused.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
PLUGIN = TESTS.parent / "fairseq_smoe"
BIN = Path(sys.executable).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")])))
TIMEOUT = 600  # a hang fails the test instead of blocking the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*cmd, cwd):
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(free_port()), *map(str, cmd)],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout + proc.stderr


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_torch_ddp_with_unused_experts_matches_one_process(tmp_path):
    sys.path.insert(0, str(TESTS))
    import ddp_worker

    steps = 3
    torchrun(TESTS / "ddp_worker.py", tmp_path / "ddp.pt", steps, cwd=tmp_path)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    model = ddp_worker.build_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        loss = sum(ddp_worker.loss_of(model, ddp_worker.rank_batch(r, step)) for r in (0, 1)) / 2
        loss.backward()
        opt.step()
    assert max_diff(ddp, model.state_dict()) < 1e-5
    # every expert moved: rank 0 trained expert 0, rank 1 expert 1, and DDP shared both updates
    for name in ("encoder.transformer_layers.0.fc1.weight", "decoder.layers.0.fc2.weight"):
        for expert in (0, 1):
            assert not torch.allclose(ddp[name][expert], initial[name][expert])


def fairseq_train_cmd(data, save_dir, *extra):
    return [
        str(BIN / "fairseq-train"), str(data), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--arch", "s2t_encdec_smoe_xs", "--encoder-layers", "2",
        "--decoder-layers", "1", "--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0",
        "--train-subset", "train", "--valid-subset", "dev", "--criterion", "label_smoothed_cross_entropy",
        "--optimizer", "adam", "--lr", "2e-3", "--max-sentences", "16", "--max-update", "6", "--seed", "7",
        "--save-dir", str(save_dir), "--disable-validation", "--cpu", "--num-workers", "0",
        "--log-format", "simple", "--log-interval", "1", *extra,
    ]


def model_params(path):
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return {k: v for k, v in state.items() if k != "smoe_signature"}


def test_fairseq_train_two_processes_equal_one_process_with_update_freq_2(corpus_dir, tmp_path):
    distributed = fairseq_train_cmd(
        corpus_dir, tmp_path / "ddp", "--distributed-world-size", "$WORLD_SIZE", "--distributed-rank", "$RANK",
        "--distributed-init-method", "env://", "--distributed-no-spawn", "--distributed-backend", "gloo",
        "--ddp-backend", "legacy_ddp")
    log = torchrun("--no-python", "bash", "-c", " ".join(distributed), cwd=tmp_path)
    assert "distributed init (rank 1): env://" in log and "num_updates=6" in log

    def single(name, *extra):
        proc = subprocess.run(fairseq_train_cmd(corpus_dir, tmp_path / name, *extra), cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return model_params(tmp_path / name / "checkpoint_last.pt")

    ddp = model_params(tmp_path / "ddp" / "checkpoint_last.pt")
    assert max_diff(ddp, single("freq2", "--update-freq", "2")) < 1e-5
    # the comparison can tell runs apart: one process with half the data per update ends elsewhere
    assert max_diff(ddp, single("freq1")) > 1e-3
