"""Multi-process training: experts that a batch does not use (no hang, no error, the same parameters as a single
process that sees the same batches), and the configuration users run: validation with WER/BLEU on a dev set of both
tasks, an epoch whose batch count is not a multiple of the number of processes, its checkpoint resumed and decoded.

Two processes on CPU with gloo, launched by torchrun:
* torch's DistributedDataParallel (fairseq's ``--ddp-backend pytorch_ddp``, the GPU default) with
  ``find_unused_parameters=False``, each rank on another route pair, against one process summing both batches;
* ``fairseq-train`` itself (``--ddp-backend legacy_ddp``: fairseq hands pytorch_ddp a CUDA device id, which torch
  refuses for a CPU model) against one process with ``--update-freq 2``. Batches are homogeneous (one bandwidth and
  one task each, the default), so on every update each rank leaves one encoder and one decoder expert unused.
"""

import csv
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch

import train_commands

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
    import ddp_worker  # tests/ is on the path: pytest puts the test files' folder there

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


# the README's CPU form of a torchrun launch (legacy_ddp: fairseq hands pytorch_ddp a CUDA device id)
DISTRIBUTED = ["--distributed-world-size", "$WORLD_SIZE", "--distributed-rank", "$RANK", "--distributed-init-method",
               "env://", "--distributed-no-spawn", "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]


def model_params(path):
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return {k: v for k, v in state.items() if k != "smoe_signature"}


def test_fairseq_train_two_processes_equal_one_process_with_update_freq_2(corpus_dir, tmp_path):
    distributed = fairseq_train_cmd(corpus_dir, tmp_path / "ddp", *DISTRIBUTED)
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


def subset_corpus(corpus_dir, dest: Path, train_groups, bad_audio_groups=()):
    """A data dir beside the fixture corpus (same audio, vocabulary, config and dev set) whose ``train_odd`` split
    holds ``train_groups[(task, bandwidth)]`` rows of each route pair; the rows of ``bad_audio_groups`` point at a
    file that cannot be decoded."""
    dest.mkdir()
    (dest / "wav").symlink_to(Path(corpus_dir) / "wav")
    for name in ("config.yaml", "spm.model", "spm.txt", "dev.tsv"):
        (dest / name).write_bytes((Path(corpus_dir) / name).read_bytes())
    (dest / "garbage.wav").write_bytes(bytes(range(256)) * 8)
    with open(Path(corpus_dir) / "train.tsv", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        fields, rows = reader.fieldnames, list(reader)
    wanted = dict(train_groups)
    wanted.update(bad_audio_groups)
    kept, seen = [], {}
    for r in rows:
        group = (r["task"], r["bandwidth"])
        if seen.get(group, 0) < wanted.get(group, 0):
            seen[group] = seen.get(group, 0) + 1
            kept.append(dict(r, audio="garbage.wav") if group in dict(bad_audio_groups) else r)
    assert seen == wanted
    with open(dest / "train_odd.tsv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fields, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        w.writeheader()
        w.writerows(kept)
    return dest


def validated_train_cmd(data, save_dir, *extra):
    """A 2-process fairseq-train as users run it (train_commands.validated_train_cmd over the odd-sized subset)."""
    return train_commands.validated_train_cmd(data, save_dir, *DISTRIBUTED, *extra, train_subset="train_odd", seed=7)


def generate(data, checkpoint, cwd, *extra):
    proc = subprocess.run([
        str(BIN / "fairseq-generate"), str(data), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--gen-subset", "dev", "--path", str(checkpoint), "--max-tokens", "20000",
        "--beam", "3", "--max-len-b", "10", "--cpu", *extra,
    ], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    return proc.returncode, proc.stdout + proc.stderr


def test_two_processes_validate_with_wer_and_bleu_over_an_odd_epoch_then_resume_and_decode(corpus_dir, tmp_path):
    """Every rank logs the same keys whatever task its batches hold and on the stand-in batch that pads the shorter
    shard, so the all-reduce of the logging outputs matches (it used to abort in gloo: ``op.preamble.length <=
    op.nbytes``); the summed BLEU counts stay integers, so the checkpoints load under weights_only."""
    # 3 route pairs x 8 rows, --max-sentences 8: 3 homogeneous batches per epoch for 2 ranks
    data = subset_corpus(corpus_dir, tmp_path / "data", {("asr", "wb"): 8, ("asr", "nb"): 8, ("st", "wb"): 8})
    save = tmp_path / "ckpt"
    log = torchrun("--no-python", "bash", "-c", " ".join(validated_train_cmd(data, save, "--max-update", "4")),
                   cwd=tmp_path)
    assert "distributed init (rank 1): env://" in log
    assert "3 batches over 2 processes: 1 stand-in batch(es) pad the shards" in log  # the odd epoch
    valid = re.findall(r"valid on 'dev' subset \|(.*)", log)
    assert len(valid) == 2, log[-4000:]  # two epochs of 2 updates each, each validated
    for line in valid:  # the dev set holds ASR and ST rows: both scores, summed over the two ranks
        assert re.search(r"\| wer [\d.]+ ", line) and re.search(r"\| bleu [\d.]+ ", line), line
    assert "num_updates 4" in valid[-1]
    best = save / "checkpoint_best.pt"
    assert best.is_file()
    state = torch.load(best, map_location="cpu", weights_only=True)
    meters = {m[1]: m[3] for m in state["extra_state"]["metrics"]["valid"]}
    assert meters["_bleu_counts"]["sum"].dtype.name == "int64" and meters["_wer_words"]["sum"] > 0

    # resume: checkpoint_last.pt through the plugin's weights_only loader, two more updates
    log = torchrun("--no-python", "bash", "-c", " ".join(validated_train_cmd(data, save, "--max-update", "6")),
                   cwd=tmp_path)
    assert re.search(r"Loaded checkpoint \S*checkpoint_last.pt \(epoch 3 @ 4 updates\)", log), log[-4000:]
    valid = re.findall(r"valid on 'dev' subset \|(.*)", log)
    assert valid and "num_updates 6" in valid[-1] and "| wer " in valid[-1] and "| bleu " in valid[-1]

    n_dev = sum(1 for _ in open(data / "dev.tsv")) - 1
    for extra in ([], ["--fp16"], ["--fp16", "--ctc-decode-weight", "0.3"]):
        rc, out = generate(data, best, tmp_path, *extra)
        assert rc == 0, (extra, out[-3000:])
        assert len(re.findall(r"^D-\d+\t", out, re.M)) == n_dev, extra


def test_two_processes_with_a_batch_emptied_by_unreadable_audio(corpus_dir, tmp_path):
    """--skip-bad-samples under 2 ranks: one route pair's rows all point at undecodable audio, so on every update
    one rank's batch is empty and fairseq runs its stand-in batch there; the ranks still log the same keys."""
    data = subset_corpus(corpus_dir, tmp_path / "data", {("asr", "wb"): 8}, bad_audio_groups={("st", "nb"): 8})
    cmd = validated_train_cmd(data, tmp_path / "ckpt", "--max-update", "2", "--skip-bad-samples",
                              "--disable-validation", "--no-save")
    log = torchrun("--no-python", "bash", "-c", " ".join(cmd), cwd=tmp_path)
    assert "2 batches over 2 processes: 0 stand-in batch(es) pad the shards" in log
    assert re.search(r"skipped \S*train_odd.tsv:\d+ .*garbage.wav", log), log[-3000:]
    assert "num_updates=2" in log
