"""fairseq-interactive with audio paths on stdin (fairseq's own S2T usage) decodes through the plugin's reader.

The real ``fairseq-interactive`` console script (the task delegates to :mod:`fairseq_smoe.hub.interactive`): NB and
WB files in one input, ASR and ST
(``--force-task``/``--force-tgt-lang``), small buffers (several datasets, several batches), each hypothesis equal to
the hub's for that file with the same beam.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

from hub_model import BEAM, BIN, MAX_LEN_B, PLUGIN, manifest_rows

def interactive(trained, stdin: str, tmp_path: Path, *extra):
    cmd = [str(BIN / "fairseq-interactive"), str(trained["corpus"]), "--user-dir", str(PLUGIN), "--task", "speech_to_text_smoe",
            "--path", str(trained["model"] / "checkpoint_best.pt"), "--config-yaml", "config.yaml",
            "--beam", str(BEAM), "--max-len-b", str(MAX_LEN_B), "--cpu", *extra]
    return subprocess.run(cmd, input=stdin, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)


def hypotheses(stdout: str) -> dict:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^D-(\d+)\t[^\t]*\t(.*)$", stdout, re.M)}


@pytest.mark.parametrize("task,lang", [("asr", "en"), ("st", "es")])
def test_interactive_decodes_audio_paths_like_the_hub(trained, hub, tmp_path, task, lang):
    data = trained["corpus"]
    paths = [str(data / r["audio"]) for s in ("test_asr_wb", "test_asr_nb") for r in manifest_rows(data, s)]
    # interleaved NB/WB, buffers of 3 lines: mixed buffers, several datasets and batches
    paths = [p for pair in zip(paths[:4], paths[4:]) for p in pair]
    proc = interactive(trained, "\n".join(paths) + "\n", tmp_path, "--buffer-size", "3", "--max-tokens", "20000",
                       "--force-task", task, "--force-tgt-lang", lang)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = hypotheses(proc.stdout)
    want = hub.generate(paths, task=task, tgt_lang=lang, beam=BEAM, max_len_b=MAX_LEN_B)
    assert [got.get(i) for i in range(len(paths))] == [w.text for w in want]
    assert {w.bandwidth for w in want} == {"nb", "wb"}
    assert "Please install torchaudio" not in proc.stderr


def test_interactive_without_a_language_refuses_at_once(trained, tmp_path):
    data = trained["corpus"]
    path = str(data / manifest_rows(data, "test_asr_wb")[0]["audio"])
    proc = interactive(trained, path + "\n", tmp_path)  # the dictionary has en and es: which one?
    assert proc.returncode != 0
    assert "pass --force-tgt-lang LANG" in proc.stderr and "<lang:en>" in proc.stderr


def test_interactive_bad_path_names_the_line_and_the_command_to_use(trained, tmp_path):
    proc = interactive(trained, str(tmp_path / "missing.wav") + "\n", tmp_path, "--force-tgt-lang", "en")
    assert proc.returncode != 0
    assert re.search(r"input line 1: .*missing\.wav: file not found", proc.stderr), proc.stderr[-2000:]
    assert "python -m fairseq_smoe.cli.transcribe" in proc.stderr


def test_restore_routes_leaves_dataset_batches_alone_and_refuses_strangers(trained, hub):
    """A fairseq-generate batch (prefix present) passes through untouched; a bare batch with no queued routes is
    refused with the commands that do work."""
    import torch

    from fairseq_smoe.hub import interactive as inter

    sample = {"decoder_prefix": torch.zeros(1, 2), "net_input": {}}
    assert inter.restore_routes(hub.task, sample) is sample
    setattr(hub.task, inter.QUEUE_ATTR, None)
    bare = {"net_input": {"src_tokens": torch.zeros(1, 5, 80), "src_lengths": torch.tensor([5])}}
    with pytest.raises(inter.InteractiveError, match="fairseq-generate .* fairseq-interactive .* fairseq_smoe.hub"):
        inter.restore_routes(hub.task, bare)
