"""End to end through fairseq's own CLIs: fairseq-train -> checkpoint -> fairseq-generate (WER and BLEU) -> resume.

Runs in subprocesses exactly as a user would, from a working directory outside the repository, with the plugin
given as an absolute --user-dir.
"""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_smoe"
BIN = Path(sys.executable).parent
GUIDING = re.compile(r"<transcribe>|<translate>|<lang:")
UPDATES = 40


def run(cmd, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{log[-6000:]}"
    return log


def train_cmd(data, save_dir, max_update, *extra):
    return [
        str(BIN / "fairseq-train"), str(data), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--arch", "s2t_encdec_smoe_xs",
        "--train-subset", "train", "--valid-subset", "dev",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
        "--clip-norm", "10", "--max-sentences", "8", "--max-update", str(max_update), "--seed", "1",
        "--save-dir", str(save_dir), "--cpu", "--num-workers", "0", "--log-format", "simple", "--log-interval", "1",
        "--best-checkpoint-metric", "wer", "--no-epoch-checkpoints", *extra,
    ]


def generate(data, ckpt, subset, scoring, cwd, *extra):
    return run([
        str(BIN / "fairseq-generate"), str(data), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--gen-subset", subset, "--path", str(ckpt),
        "--max-tokens", "20000", "--beam", "3", "--max-len-b", "40", "--cpu", "--scoring", scoring, *extra,
    ], cwd)


def rows(data, subset):
    with open(Path(data) / f"{subset}.tsv", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def hypotheses(log):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^D-(\d+)\t[^\t]*\t(.*)$", log, re.M)}


@pytest.fixture(scope="module")
def trained(corpus_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    log = run(train_cmd(corpus_dir, work / "ckpt", UPDATES), cwd=work)
    return corpus_dir, work, log


def test_training_loss_falls_and_checkpoints_are_written(trained):
    _, work, log = trained
    losses = [float(x) for x in re.findall(r"train_inner \| .*? loss=([\d.]+)", log)]
    assert len(losses) == UPDATES, log[-3000:]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, f"loss did not fall: first updates {losses[:5]}, last {losses[-5:]}"
    # validation decodes and reports WER (ASR rows) and BLEU (ST rows)
    assert re.search(r"valid on 'dev' subset \|.* wer [\d.]+ \|.* bleu [\d.]+", log), log[-3000:]
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        assert (work / "ckpt" / name).stat().st_size > 0


def test_generate_asr_with_wer(trained):
    data, work, _ = trained
    log = generate(data, work / "ckpt" / "checkpoint_last.pt", "test_asr_nb", "wer", work)
    wer = re.search(r"Generate test_asr_nb with beam=3: WER: ([\d.]+)", log)
    assert wer, log[-3000:]
    hyps = hypotheses(log)
    assert len(hyps) == len(rows(data, "test_asr_nb"))
    assert not any(GUIDING.search(line) for line in log.splitlines() if line[:2] in ("H-", "D-", "T-"))
    # references are the manifest's transcripts, with no guiding tokens
    refs = set(re.findall(r"^T-\d+\t(.*)$", log, re.M))
    assert refs <= {r["tgt_text"] for r in rows(data, "test_asr_nb")}


def test_generate_st_with_bleu(trained):
    data, work, _ = trained
    log = generate(data, work / "ckpt" / "checkpoint_last.pt", "test_st_wb", "sacrebleu", work)
    assert re.search(r"Generate test_st_wb with beam=3: BLEU = [\d.]+", log), log[-3000:]
    assert len(hypotheses(log)) == len(rows(data, "test_st_wb"))
    assert not any(GUIDING.search(line) for line in log.splitlines() if line[:2] in ("H-", "D-", "T-"))


def test_force_task_decodes_asr_set_as_translation(trained):
    data, work, _ = trained
    asr = hypotheses(generate(data, work / "ckpt" / "checkpoint_last.pt", "test_asr_wb", "wer", work))
    st = hypotheses(generate(data, work / "ckpt" / "checkpoint_last.pt", "test_asr_wb", "sacrebleu", work,
                             "--force-task", "st", "--force-tgt-lang", "es"))
    assert len(st) == len(asr) == len(rows(data, "test_asr_wb"))
    assert st != asr  # another guiding prefix and decoder expert give another output


def test_resume_with_restore_file_then_decode(trained):
    data, work, _ = trained
    resumed = work / "resumed"
    log = run(train_cmd(data, resumed, UPDATES + 6, "--restore-file", str(work / "ckpt" / "checkpoint_last.pt")),
              cwd=work)
    assert re.search(rf"Loaded checkpoint .*checkpoint_last.pt \(epoch \d+ @ {UPDATES} updates\)", log), log[-3000:]
    updates = [int(x) for x in re.findall(r"num_updates=(\d+)", log)]
    assert updates and min(updates) == UPDATES + 1 and max(updates) == UPDATES + 6
    out = generate(data, resumed / "checkpoint_last.pt", "test_asr_wb", "wer", work)
    assert re.search(r"WER: [\d.]+", out)
    assert len(hypotheses(out)) == len(rows(data, "test_asr_wb"))


def test_checkpoint_with_another_routing_table_is_refused(trained, tmp_path):
    data, work, _ = trained
    cfg = (Path(data) / "config.yaml").read_text().replace("- wb\n  - nb", "- nb\n  - wb")
    assert cfg != (Path(data) / "config.yaml").read_text()
    swapped = data_copy(data, tmp_path / "data", config=cfg)
    err = refused([
        str(BIN / "fairseq-generate"), str(swapped), "--user-dir", str(PLUGIN), "--task", "speech_to_text_smoe",
        "--gen-subset", "test_asr_wb", "--path", str(work / "ckpt" / "checkpoint_last.pt"), "--cpu",
    ], tmp_path)
    assert "encoder experts are routed as [wb,nb] but config.yaml (smoe.encoder_routes) says [nb,wb]" in err

def data_copy(data, dest: Path, config=None, dictionary=None) -> Path:
    """A data dir sharing the audio and manifests of ``data``, with its own config.yaml / spm.txt if given."""
    dest.mkdir()
    for f in Path(data).iterdir():
        if f.is_file() and not (f.name == "config.yaml" and config) and not (f.name == "spm.txt" and dictionary):
            (dest / f.name).symlink_to(f)
    (dest / "wav").symlink_to(Path(data) / "wav")
    if config:
        (dest / "config.yaml").write_text(config)
    if dictionary:
        (dest / "spm.txt").write_text(dictionary)
    return dest


def refused(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "size mismatch" not in proc.stderr  # not torch's shape trace: our message
    return proc.stderr


@pytest.mark.parametrize("change", ["extra_entry", "same_size_reordered"])
def test_checkpoint_with_another_dictionary_is_refused(trained, tmp_path, change):
    data, work, _ = trained
    lines = (Path(data) / "spm.txt").read_text().splitlines()
    if change == "extra_entry":
        lines.append("▁zebra 1")
    else:
        lines[10], lines[11] = lines[11], lines[10]
    other = data_copy(data, tmp_path / "data", dictionary="\n".join(lines) + "\n")
    ckpt = work / "ckpt" / "checkpoint_last.pt"
    err = refused([
        str(BIN / "fairseq-generate"), str(other), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--gen-subset", "test_asr_wb", "--path", str(ckpt), "--cpu",
    ], tmp_path)
    if change == "extra_entry":
        assert f"CheckpointMismatchError: {ckpt} was trained with a dictionary of {len(lines) + 3} entries, " \
               f"but {other / 'spm.txt'} has {len(lines) + 4}" in err, err[-3000:]
    else:
        assert f"CheckpointMismatchError: {ckpt} was trained with another dictionary of the same size" in err
        assert str(other / "spm.txt") in err


def test_resuming_with_another_routing_table_is_refused(trained, tmp_path):
    """--restore-file loads weights into a model built from this run's config: the signature catches the swap."""
    data, work, _ = trained
    cfg = (Path(data) / "config.yaml").read_text().replace("- transcribe\n  - translate", "- translate\n  - transcribe")
    swapped = data_copy(data, tmp_path / "data", config=cfg)
    ckpt = work / "ckpt" / "checkpoint_last.pt"
    err = refused(train_cmd(swapped, tmp_path / "resumed", UPDATES + 2, "--restore-file", str(ckpt)), tmp_path)
    assert f"CheckpointMismatchError: {ckpt} was trained with decoder experts routed as ['transcribe', 'translate'], " \
           f"but this run's model has decoder experts routed as ['translate', 'transcribe']" in err, err[-3000:]
