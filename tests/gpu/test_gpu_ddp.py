"""Two fairseq-train processes (torchrun, the README's form) with validation on and ``--best-checkpoint-metric wer``,
with ``--ddp-backend pytorch_ddp`` and ``legacy_ddp``; the checkpoint decodes with fairseq-generate.

Homogeneous batches (the default) give the two ranks different tasks and unused experts on every update, and the
dev set holds ASR and ST rows, so the ranks' validation logs differ unless the task pads them to one layout.
Device: one GPU per rank with NCCL where there are two or more; with one GPU both ranks share it over gloo (NCCL
refuses two ranks on one device). CPU rehearsal: gloo, ``--cpu``; pytorch_ddp skips there (fairseq hands
DistributedDataParallel a CUDA device id, which torch refuses for a CPU model)."""

import re

import pytest

from gpu_helpers import generate_cmd, hypotheses, native_bf16, rows, run, threads, torchrun_bash, train_cmd

UPDATES = 6


@pytest.mark.parametrize("ddp_backend", ["pytorch_ddp", "legacy_ddp"])
def test_two_processes_train_validate_and_decode(device, n_gpus, gpu_corpus, tmp_path, ddp_backend):
    if device == "cpu" and ddp_backend == "pytorch_ddp":
        pytest.skip("pytorch_ddp needs CUDA in fairseq (it passes a CUDA device id to DistributedDataParallel)")
    backend = "nccl" if n_gpus >= 2 else "gloo"
    device_id = "$LOCAL_RANK" if n_gpus >= 2 else "0"
    precision = "bf16" if device == "cuda" and native_bf16(device) else "fp32"
    cmd = train_cmd(device, gpu_corpus, tmp_path / "ckpt", precision, UPDATES,
                    "--distributed-world-size", "$WORLD_SIZE", "--distributed-rank", "$RANK",
                    "--distributed-init-method", "env://", "--distributed-no-spawn", "--device-id", device_id,
                    "--distributed-backend", backend, "--ddp-backend", ddp_backend)
    log = torchrun_bash(" ".join(cmd), cwd=tmp_path, n_threads=threads(device))
    assert "distributed init (rank 1): env://" in log, log[-3000:]
    assert re.search(rf"num_updates={UPDATES}\b", log), log[-3000:]
    valid = re.search(r"valid on 'dev' subset \|.*? wer ([\d.]+) \|.*? bleu ([\d.]+)", log)
    assert valid, log[-3000:]
    ckpt = tmp_path / "ckpt" / "checkpoint_best.pt"
    assert ckpt.is_file()
    # the multi-process checkpoint (metrics summed over ranks included) loads through the plugin's safe loader
    out = run(generate_cmd(device, gpu_corpus, ckpt, "test_asr_wb", "fp32"), cwd=tmp_path,
              n_threads=threads(device))
    assert re.search(r"WER: [\d.]+", out), out[-3000:]
    assert len(hypotheses(out)) == rows(gpu_corpus, "test_asr_wb")
