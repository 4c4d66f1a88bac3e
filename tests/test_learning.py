"""The model listens: after a few minutes of CPU training on the flite fixture, EncDecS-MoE transcribes a speaker it
never heard (sentences seen in training) far better than the empty hypothesis, and its outputs follow the audio.

A falling loss alone does not show this: a decoder that ignores the encoder also lowers the loss by learning the
target language. Here each test utterance must be told apart from the other sentences by its audio alone.
"""

import os
import re
import subprocess

import pytest

from test_e2e import BIN, PLUGIN, generate, hypotheses, rows

UPDATES = 800  # about 2.5 minutes on 2 CPU cores; measured WER at this point: 56 (WB) and 37 (NB)


@pytest.fixture(scope="module")
def listened(corpus_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("learning")
    cmd = [
        str(BIN / "fairseq-train"), str(corpus_dir), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--arch", "s2t_encdec_smoe_xs", "--train-subset", "train",
        "--valid-subset", "dev", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100",
        "--clip-norm", "10", "--max-sentences", "16", "--max-update", str(UPDATES), "--seed", "1",
        "--save-dir", str(work / "ckpt"), "--cpu", "--num-workers", "0", "--log-format", "simple",
        "--log-interval", "100", "--no-epoch-checkpoints", "--disable-validation",
    ]
    # one thread: tiny matrices gain nothing from two, and two threads per process on a loaded machine crawl
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return corpus_dir, work


@pytest.mark.parametrize("subset", ["test_asr_nb", "test_asr_wb"])
def test_unseen_speaker_is_transcribed_from_the_audio(listened, subset):
    data, work = listened
    log = generate(data, work / "ckpt" / "checkpoint_last.pt", subset, "wer", work)
    wer = float(re.search(rf"Generate {subset} with beam=3: WER: ([\d.]+)", log).group(1))
    assert wer < 80, f"{subset}: WER {wer} (empty hypothesis: 100)\n{log[-2000:]}"
    hyps = hypotheses(log)
    refs = {int(m.group(1)): m.group(2) for m in re.finditer(r"^T-(\d+)\t(.*)$", log, re.M)}
    assert len(set(hyps.values())) >= 4, hyps  # not one sentence for every input
    assert sum(hyps[i] == refs[i] for i in refs) >= 2, (hyps, refs)
    assert len(refs) == len(rows(data, subset))
