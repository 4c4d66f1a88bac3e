"""What the GPU suite's tests share: the mode (CUDA, CPU rehearsal, skip), the precision flags of each mode, and the
fairseq command lines, run in subprocesses as a user would.

Precision flags (``PRECISIONS``; the CPU rehearsal adds ``--cpu``):

* fp32: none;
* fp16: ``--fp16`` (fairseq's FP16 optimizer; on the CPU, training adds ``--memory-efficient-fp16``, since the FP16
  optimizer keeps its fp32 master copy on ``torch.cuda.current_device()``);
* amp: ``--amp`` (autocast in fp16, fp32 master weights, gradient scaler);
* bf16: ``--amp --amp-dtype bfloat16`` (autocast in bf16; the CPU has bf16 autocast too).

fairseq's own ``--bf16`` means TPU (it sets ``tpu = True``), so the plugin's bf16 route is the task's
``--amp-dtype bfloat16`` with fairseq's ``--amp``.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
PLUGIN = REPO / "fairseq_smoe"
BIN = Path(sys.executable).parent
TIMEOUT = 600  # a hang fails its test instead of blocking the suite

SKIP_REASON = "no CUDA device (set SMOE_GPU_TESTS=cpu to rehearse the GPU suite on the CPU)"
CUDA_ONLY = "CUDA-only check ({what}); skipped in the CPU rehearsal"

TRAIN_UPDATES = 16
TRAIN_PRECISIONS = ("fp16", "amp", "bf16")
PRECISIONS = {
    "fp32": [],
    "fp16": ["--fp16"],
    "amp": ["--amp"],
    "bf16": ["--amp", "--amp-dtype", "bfloat16"],
}


def gpu_mode() -> Optional[str]:
    """``"cuda"``, ``"cpu"`` (rehearsal, ``SMOE_GPU_TESTS=cpu``) or None (no CUDA: the suite skips)."""
    want = os.environ.get("SMOE_GPU_TESTS", "").strip().lower()
    if want == "cpu":
        return "cpu"
    if want not in ("", "cuda", "gpu", "1"):
        raise ValueError(f"SMOE_GPU_TESTS={want!r}: use 'cpu' (rehearse on the CPU) or leave it unset")
    return "cuda" if torch.cuda.is_available() else None


def native_bf16(mode: str) -> bool:
    """bf16 the hardware computes (Ampere and later; the CPU rehearsal's autocast has it too). torch's default
    ``is_bf16_supported()`` also says yes for emulation, which the task refuses for ``--amp-dtype bfloat16``."""
    if mode == "cpu":
        return True
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch without the argument
        return torch.cuda.is_bf16_supported()


NO_BF16 = "this GPU has no bf16 hardware (Ampere or later needed): --amp --amp-dtype bfloat16 is refused there"


def device_flags(mode: str) -> List[str]:
    return ["--cpu"] if mode == "cpu" else []


# fairseq's FP16Optimizer keeps its fp32 master copy on ``torch.cuda.current_device()``: on the CPU the half
# model trains through the memory-efficient variant (fp16 weights and gradients, fp32 optimizer state)
CPU_TRAIN_PRECISIONS = dict(PRECISIONS, fp16=["--fp16", "--memory-efficient-fp16"])


def precision_flags(mode: str, precision: str, train: bool = False) -> List[str]:
    table = CPU_TRAIN_PRECISIONS if (mode == "cpu" and train) else PRECISIONS
    return device_flags(mode) + table[precision]


def threads(mode: str) -> int:
    """Torch threads per subprocess: 1 on the CPU rehearsal (shared cores), a few on a GPU node (data loading)."""
    return 1 if mode == "cpu" else 2


def num_workers(mode: str) -> int:
    # workers are processes: on the CPU rehearsal they only add start-up time
    return 0 if mode == "cpu" else 2


def env(n_threads: int = 1, **extra) -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(n_threads),
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    e.update(extra)
    return e


def run(cmd: List, cwd: Path, n_threads: int = 1, timeout: int = TIMEOUT, check: bool = True):
    """Run a CLI to completion in ``cwd`` (its log kept there); returns its output (``check``: exit 0 or fail the test
    with the command's last lines), else ``(returncode, output)``."""
    cmd = list(map(str, cmd))
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env(n_threads), capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    Path(cwd).mkdir(parents=True, exist_ok=True)
    with open(Path(cwd) / "commands.log", "a") as f:
        f.write(f"$ {' '.join(cmd)}\n# exit {proc.returncode} after {time.monotonic() - start:.1f} s\n{log}\n")
    if not check:
        return proc.returncode, log
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexited {proc.returncode} after " \
                                 f"{time.monotonic() - start:.0f} s:\n{log[-6000:]}"
    return log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_bash(line: str, cwd: Path, nproc: int = 2, n_threads: int = 1, timeout: int = TIMEOUT) -> str:
    """``torchrun --no-python bash -c LINE`` on ``nproc`` local ranks (the README's torchrun form)."""
    return run([BIN / "torchrun", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
                free_port(), "--no-python", "bash", "-c", line], cwd=cwd, n_threads=n_threads, timeout=timeout)


def train_cmd(mode: str, data: Path, save_dir: Path, precision: str, max_update: int, *extra,
              arch: str = "s2t_encdec_smoe_xs") -> List[str]:
    """A few updates of an _xs model (2 encoder / 1 decoder layers) with the auxiliary CTC loss, validated once at
    the end with greedy decoding and WER as the best-checkpoint metric."""
    return [
        str(BIN / "fairseq-train"), str(data), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--arch", arch, "--encoder-layers", "2", "--decoder-layers", "1",
        "--train-subset", "train", "--valid-subset", "dev",
        "--criterion", "label_smoothed_cross_entropy_asr_ctc", "--ctc-weight", "0.3", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4",
        "--clip-norm", "10", "--max-sentences", "16", "--max-update", str(max_update), "--seed", "1",
        "--save-dir", str(save_dir), "--num-workers", str(num_workers(mode)),
        "--validate-interval-updates", str(max_update), "--no-epoch-checkpoints",
        "--best-checkpoint-metric", "wer", "--eval-max-len-b", "20",
        "--log-format", "simple", "--log-interval", "1", *precision_flags(mode, precision, train=True), *extra,
    ]


def generate_cmd(mode: str, data: Path, ckpt: Path, subset: str, precision: str, *extra) -> List[str]:
    scoring = ["--scoring", "wer"] if "_asr_" in subset else ["--scoring", "sacrebleu"]
    return [
        str(BIN / "fairseq-generate"), str(data), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--gen-subset", subset, "--path", str(ckpt), "--max-tokens", "20000",
        "--beam", "3", "--max-len-a", "0", "--max-len-b", "20", "--num-workers", str(num_workers(mode)),
        *scoring, *precision_flags(mode, precision), *extra,
    ]


def train_losses(log: str) -> List[float]:
    """Per-update training losses of a ``--log-interval 1`` fairseq-train log (nan/inf kept as floats)."""
    return [float(x) for x in re.findall(r"train_inner \| .*? loss=([-+\w.]+)", log)]


def hypotheses(log: str) -> dict:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^D-(\d+)\t[^\t]*\t(.*)$", log, re.M)}


def rows(data: Path, subset: str) -> int:
    with open(Path(data) / f"{subset}.tsv", encoding="utf-8") as f:
        return sum(1 for _ in f) - 1


def record(name: str, data: dict) -> None:
    """Write a measurement to ``$SMOE_GPU_RESULTS/<name>.json`` when that folder is given (and print it)."""
    print(f"[gpu-suite] {name}: {json.dumps(data)}")
    out = os.environ.get("SMOE_GPU_RESULTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
