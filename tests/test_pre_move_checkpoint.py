"""Checkpoints written by the plugin before the redesign (tests/data/pre_move, commit a678e64) load and decode
identically with the code as it is now: same hypotheses, same scores (to float rounding), through fairseq-generate.

The redesign moved every module; checkpoints hold no plugin class (only fairseq's cfg, names and tensors), so a
rename must not break a user's trained models. ``make.py`` there says how the files were made.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data" / "pre_move"
PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_smoe"
BIN = Path(sys.executable).parent
EXPECTED = json.loads((DATA / "expected.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("arch", sorted(EXPECTED["hypotheses"]))
def test_pre_move_checkpoint_decodes_identically(arch, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(BIN / "fairseq-generate"), str(DATA), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
         "--task", "speech_to_text_smoe", "--gen-subset", "test", "--path", str(DATA / f"{arch}.pt"),
         "--max-tokens", "20000", "--beam", "3", "--max-len-b", "20", "--cpu", "--scoring", "wer"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    want = EXPECTED["hypotheses"][arch]
    got_text = {m.group(1): m.group(2) for m in re.finditer(r"^D-(\d+)\t\S+\t(.*)$", proc.stdout, re.M)}
    got_score = {m.group(1): float(m.group(2)) for m in re.finditer(r"^H-(\d+)\t(\S+)\t", proc.stdout, re.M)}
    got_pos = {m.group(1): [float(x) for x in m.group(2).split()]
               for m in re.finditer(r"^P-(\d+)\t(.*)$", proc.stdout, re.M)}
    assert got_text == {k: v["text"] for k, v in want.items()}
    for k, v in want.items():
        assert got_score[k] == pytest.approx(v["score"], abs=1e-4), k
        assert got_pos[k] == pytest.approx(v["positional_scores"], abs=1e-4), k
