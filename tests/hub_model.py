"""The tiny trained model the hub tests share (``trained`` / ``hub`` fixtures in conftest.py) and their helpers.

``trained_model`` trains a tiny s2t_encdec_smoe_xs once per test session (a lock and a marker file make the first
caller train and the others reuse); ``fairseq_generate`` gives fairseq-generate's hypotheses for comparison.
"""

import csv
import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from fixture_corpus import make_corpus

PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_smoe"
BIN = Path(sys.executable).parent
TINY = ["--encoder-layers", "2", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2", "--conv-channels", "32"]
UPDATES = 200  # enough for hypotheses that differ between utterances (the long-audio test needs that)
BEAM, MAX_LEN_B = 3, 40


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def trained_model(tmp_path_factory, flite_cache) -> dict:
    """A model folder (checkpoint_best.pt, config.yaml, spm.model, spm.txt) and its corpus, built once per session.

    Every hub test file calls this; a lock and a marker file make the first caller train and the others reuse.
    """
    base = tmp_path_factory.getbasetemp() / "hub_model"
    base.mkdir(exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        model, root = base / "model", base / "corpus"
        if not (model / "done").exists():
            shutil.rmtree(model, ignore_errors=True)
            make_corpus(root, n_train_sentences=16, n_dev_sentences=2, n_test_sentences=4, vocab_size=120,
                        cache_dir=flite_cache)
            save = base / "ckpt"
            cmd = [str(BIN / "fairseq-train"), str(root), "--user-dir", str(PLUGIN),
                   "--config-yaml", "config.yaml", "--task", "speech_to_text_smoe", "--arch", "s2t_encdec_smoe_xs",
                   *TINY, "--criterion", "label_smoothed_cross_entropy_asr_ctc", "--ctc-weight", "0.3",
                   "--label-smoothing", "0.1",
                   "--train-subset", "train", "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler",
                   "inverse_sqrt", "--warmup-updates", "5", "--max-sentences", "16", "--max-update", str(UPDATES),
                   "--seed", "1", "--save-dir", str(save), "--cpu", "--num-workers", "0", "--no-epoch-checkpoints",
                   "--no-save-optimizer-state", "--disable-validation", "--log-format", "simple"]
            proc = subprocess.run(cmd, cwd=base, env=_env(), capture_output=True, text=True, timeout=1200)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
            model.mkdir()
            shutil.copyfile(save / "checkpoint_last.pt", model / "checkpoint_best.pt")
            for name in ("config.yaml", "spm.model", "spm.txt"):
                shutil.copyfile(root / name, model / name)
            (model / "done").write_text("ok")
    return {"model": model, "corpus": root}


def manifest_rows(data: Path, subset: str):
    with open(data / f"{subset}.tsv", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def fairseq_generate(data: Path, ckpt: Path, subset: str, cwd: Path, *extra) -> dict:
    """fairseq-generate's detokenized hypotheses ``{row index: text}`` for a manifest."""
    proc = subprocess.run(
        [str(BIN / "fairseq-generate"), str(data), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
         "--task", "speech_to_text_smoe", "--gen-subset", subset, "--path", str(ckpt), "--max-tokens", "20000",
         "--beam", str(BEAM), "--max-len-b", str(MAX_LEN_B), "--cpu", "--scoring", "wer", *extra],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^D-(\d+)\t[^\t]*\t(.*)$", proc.stdout, re.M)}
