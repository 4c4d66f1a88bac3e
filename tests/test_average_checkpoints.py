"""python -m fairseq_smoe.cli.average_checkpoints: fairseq's checkpoint averaging, loading only safe checkpoints and
refusing checkpoints of different models.

Tiny models (the dimensions of tests/data/pre_move/make.py) are trained for a few updates on the 8 utterances of
tests/data/pre_move (ASR and ST, NB and WB), saving a checkpoint after every update; copies of that data dir with
other routes (config.yaml) or another dictionary (spm.txt) give real mismatched checkpoints.
"""

import datetime
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairseq import checkpoint_utils
from fairseq_smoe.checkpoint import signature

DATA = Path(__file__).resolve().parent / "data" / "pre_move"
PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_smoe"
BIN = Path(sys.executable).parent
ARCH = "s2t_encdec_smoe_xs"
TINY = ["--encoder-layers", "2", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2", "--conv-channels", "32"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def train(data: Path, save_dir: Path, max_update: int, arch: str = ARCH):
    proc = subprocess.run(
        [str(BIN / "fairseq-train"), str(data), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
         "--task", "speech_to_text_smoe", "--arch", arch, *TINY, "--criterion", "label_smoothed_cross_entropy",
         "--label-smoothing", "0.1", "--train-subset", "train", "--optimizer", "adam", "--lr", "3e-3",
         "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "2", "--max-sentences", "4",
         "--max-update", str(max_update), "--seed", "1", "--save-dir", str(save_dir), "--cpu", "--num-workers", "0",
         "--disable-validation", "--save-interval-updates", "1", "--keep-interval-updates", "10"],
        env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def average(*args):
    return subprocess.run([sys.executable, "-m", "fairseq_smoe.cli.average_checkpoints", *map(str, args)],
                          env=ENV, capture_output=True, text=True, timeout=600)


def generate(ckpt: Path, cwd: Path) -> dict:
    proc = subprocess.run(
        [str(BIN / "fairseq-generate"), str(DATA), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
         "--task", "speech_to_text_smoe", "--gen-subset", "test", "--path", str(ckpt), "--max-tokens", "20000",
         "--beam", "3", "--max-len-b", "20", "--cpu", "--scoring", "wer"],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"^H-(\d+)\t(\S+)\t(.*)$", proc.stdout, re.M)}


def weights(path: Path) -> dict:
    return checkpoint_utils.load_checkpoint_to_cpu(str(path))["model"]


def data_copy(dst: Path) -> Path:
    """tests/data/pre_move without its checkpoints, its test set also as the train split (fairseq wants train*)."""
    shutil.copytree(DATA, dst, ignore=shutil.ignore_patterns("*.pt", "*.json", "make.py"))
    shutil.copyfile(dst / "test.tsv", dst / "train.tsv")
    return dst


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run of 8 updates, 2 epochs of 4 (one batch per route pair), saving after every update:
    checkpoint_{1_1,1_2,1_3,2_5,2_6,2_7}.pt, and checkpoint{1,2}.pt at the epochs' ends (updates 4 and 8)."""
    root = tmp_path_factory.mktemp("avg")
    train(data_copy(root / "data"), root / "ckpt", 8)
    return root / "ckpt"


def test_the_average_of_copies_of_one_checkpoint_is_that_checkpoint(run, tmp_path):
    src = run / "checkpoint_2_7.pt"
    copies = []
    for i in range(3):  # 3: a sum in the tensors' own float32 would not divide back exactly
        copies.append(tmp_path / f"copy{i}.pt")
        shutil.copyfile(src, copies[-1])
    out = tmp_path / "avg" / "avg3.pt"
    proc = average("--inputs", *copies, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}: the average of 3 checkpoints" in proc.stdout
    a, b = weights(src), weights(out)
    assert list(a) == list(b) and signature.SIGNATURE_KEY in b
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert not (out.parent / "avg3.pt.tmp").exists()
    # and fairseq-generate (weights_only loading through the plugin's allow-list) decodes it identically
    assert generate(out, tmp_path) == generate(src, tmp_path)


def test_the_average_of_two_checkpoints_is_their_elementwise_mean(run, tmp_path):
    out = tmp_path / "avg2.pt"
    proc = average("--inputs", run / "checkpoint_2_7.pt", run / "checkpoint_1_3.pt", "--output", out)
    assert proc.returncode == 0, proc.stderr
    a, b, avg = weights(run / "checkpoint_2_7.pt"), weights(run / "checkpoint_1_3.pt"), weights(out)
    changed = 0
    for k, t in a.items():
        if t.is_floating_point():
            assert torch.equal(avg[k], ((t.double() + b[k].double()) / 2).to(t.dtype)), k
            changed += not torch.equal(t, b[k])
        else:
            assert torch.equal(avg[k], t), k
    assert changed > 10  # four updates apart: the weights differ, so the mean is a new model
    # the non-model state is the first input's (fairseq keeps it: with a directory, the newest checkpoint's)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(out))
    assert state["optimizer_history"][-1]["num_updates"] == 7


def test_newest_n_update_and_epoch_checkpoints_are_picked(run, tmp_path):
    proc = average("--inputs", run, "--num-update-checkpoints", "2", "--output", tmp_path / "u.pt")
    assert proc.returncode == 0, proc.stderr
    assert f"averaging 2 checkpoints: {run / 'checkpoint_2_7.pt'} {run / 'checkpoint_2_6.pt'}" in proc.stdout
    a, b, avg = weights(run / "checkpoint_2_7.pt"), weights(run / "checkpoint_2_6.pt"), weights(tmp_path / "u.pt")
    k = "decoder.embed_tokens.weight"
    assert torch.equal(avg[k], ((a[k].double() + b[k].double()) / 2).float())
    proc = average("--inputs", run, "--num-update-checkpoints", "2", "--checkpoint-upper-bound", "5",
                   "--output", tmp_path / "u2.pt")
    assert f"averaging 2 checkpoints: {run / 'checkpoint_2_5.pt'} {run / 'checkpoint_1_3.pt'}" in proc.stdout
    # epoch checkpoints: by epoch number, not by name (checkpoint10.pt is newer than checkpoint9.pt)
    ep = tmp_path / "epochs"
    ep.mkdir()
    for e in (1, 2, 9, 10):
        shutil.copyfile(run / "checkpoint2.pt", ep / f"checkpoint{e}.pt")
    shutil.copyfile(run / "checkpoint2.pt", ep / "checkpoint_last.pt")
    proc = average("--inputs", ep, "--num-epoch-checkpoints", "3", "--output", tmp_path / "e.pt")
    assert proc.returncode == 0, proc.stderr
    assert f"averaging 3 checkpoints: {ep / 'checkpoint10.pt'} {ep / 'checkpoint9.pt'} {ep / 'checkpoint2.pt'}" \
        in proc.stdout
    proc = average("--inputs", ep, "--num-epoch-checkpoints", "5", "--output", tmp_path / "e5.pt")
    assert proc.returncode == 1
    assert f"{ep}: found 4 checkpoint<epoch>.pt files, need at least 5" in proc.stderr
    assert not (tmp_path / "e5.pt").exists()
    proc = average("--inputs", ep, "--output", tmp_path / "d.pt")
    assert proc.returncode == 1
    assert "a directory needs --num-epoch-checkpoints or --num-update-checkpoints" in proc.stderr
    proc = average("--inputs", ep / "checkpoint1.pt", "--checkpoint-upper-bound", "3", "--output", tmp_path / "x.pt")
    assert proc.returncode == 2 and "--checkpoint-upper-bound needs --num-epoch-checkpoints" in proc.stderr


def test_checkpoints_of_other_models_are_refused(run, tmp_path):
    ckpt = run / "checkpoint_2_7.pt"
    # another architecture: the learned-gate model written by the pre-move code (same dimensions)
    other = DATA / "s2t_encdec_lmoe_xs.pt"
    proc = average("--inputs", ckpt, other, "--output", tmp_path / "a.pt")
    assert proc.returncode == 1
    assert (f"{ckpt} and {other} have different architectures (s2t_encdec_smoe_xs vs s2t_encdec_lmoe_xs)"
            in proc.stderr)
    # other routes: the same data with the decoder routes in the other order (expert 0 = translate)
    swapped = data_copy(tmp_path / "swapped")
    cfg = (swapped / "config.yaml").read_text()
    swapped_cfg = cfg.replace("  - transcribe\n  - translate\n", "  - translate\n  - transcribe\n")
    assert swapped_cfg != cfg
    (swapped / "config.yaml").write_text(swapped_cfg)
    train(swapped, tmp_path / "swapped_ckpt", 1)
    proc = average("--inputs", ckpt, tmp_path / "swapped_ckpt" / "checkpoint_last.pt", "--output", tmp_path / "b.pt")
    assert proc.returncode == 1
    assert (f"{ckpt} and {tmp_path / 'swapped_ckpt' / 'checkpoint_last.pt'} have different decoder routes "
            f"(['transcribe', 'translate'] vs ['translate', 'transcribe'])") in proc.stderr
    # another dictionary: one more entry in spm.txt
    bigger = data_copy(tmp_path / "bigger")
    with open(bigger / "spm.txt", "a", encoding="utf-8") as f:
        f.write("zzzextra 1\n")
    train(bigger, tmp_path / "bigger_ckpt", 1)
    proc = average("--inputs", ckpt, tmp_path / "bigger_ckpt" / "checkpoint_last.pt", "--output", tmp_path / "c.pt")
    assert proc.returncode == 1
    n = len(weights(ckpt)["decoder.embed_tokens.weight"])
    assert re.search(rf"{re.escape(str(ckpt))} and {re.escape(str(tmp_path / 'bigger_ckpt' / 'checkpoint_last.pt'))} "
                     rf"have different dictionaries \({n} entries, md5 [0-9a-f]+ vs {n + 1} entries", proc.stderr)
    assert not any((tmp_path / x).exists() for x in ("a.pt", "b.pt", "c.pt"))


def test_an_unsafe_pickle_is_refused_and_nothing_in_it_runs(run, tmp_path):
    state = checkpoint_utils.load_checkpoint_to_cpu(str(run / "checkpoint_2_7.pt"))
    from fairseq_smoe.checkpoint.safety import plain_containers

    state = plain_containers(state)
    state["extra_state"]["when"] = datetime.date(2026, 1, 1)  # a global outside the allow-list
    bad = tmp_path / "unsafe.pt"
    torch.save(state, bad)
    proc = average("--inputs", run / "checkpoint_2_7.pt", bad, "--output", tmp_path / "out.pt")
    assert proc.returncode == 1
    assert f"{bad}: refused to load" in proc.stderr and "datetime.date" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out.pt").exists()
    proc = average("--inputs", tmp_path / "missing.pt", "--output", tmp_path / "out.pt")
    assert proc.returncode == 1 and f"{tmp_path / 'missing.pt'}: no such checkpoint file" in proc.stderr
