"""A third decoder route by configuration and vocabulary alone: the proof that routing.py is the one route contract.

The flite corpus gains a manifest task ``sum`` (target: the first three words of the transcript) whose guiding token
is ``<summarize>``; ``config.yaml`` says ``smoe: {decoder_routes: [transcribe, translate, summarize], tasks: {asr:
transcribe, st: translate, sum: summarize}}`` (``asr_tasks`` keeps its default ``[asr]``: ``sum`` rows are scored by
BLEU) and the vocabulary holds ``<summarize>``. No Python changes: fairseq-train trains a few updates of an S-MoE
model, which has three decoder experts; fairseq-generate decodes the ``sum`` rows without guiding tokens in the
output, and in the loaded checkpoint those rows run decoder expert 2 and only expert 2.
"""

import argparse
import copy
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fairseq_smoe.data.manifest import MANIFEST_COLUMNS, read_manifest
from fairseq_smoe.data.vocab import build_vocab

PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_smoe"
BIN = Path(sys.executable).parent
DECODER_ROUTES = ["transcribe", "translate", "summarize"]
TASKS = {"asr": "transcribe", "st": "translate", "sum": "summarize"}
GUIDING = re.compile(r"<transcribe>|<translate>|<summarize>|<lang:")
UPDATES = 6


def summary(text: str) -> str:
    return " ".join(text.split()[:3])


def write_tsv(path: Path, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, MANIFEST_COLUMNS, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE,
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def with_sum_rows(rows, src_root: Path, keep=("asr", "st", "sum")):
    """The rows (audio made absolute) plus one ``sum`` row per ``asr`` row, on the same audio."""
    out = []
    for r in rows:
        r = dict(r, audio=str(src_root / r["audio"]))
        if r["task"] in keep:
            out.append(r)
        if r["task"] == "asr" and "sum" in keep:
            out.append(dict(r, id=r["id"].replace("_asr_", "_sum_"), task="sum", tgt_text=summary(r["tgt_text"])))
    return out


@pytest.fixture(scope="module")
def sum_data(flite_corpus, tmp_path_factory) -> Path:
    src = Path(flite_corpus["root"])
    data = tmp_path_factory.mktemp("third_route_data")
    train = with_sum_rows(read_manifest(str(src / "train.tsv")), src)
    write_tsv(data / "train.tsv", train)
    write_tsv(data / "dev.tsv", with_sum_rows(read_manifest(str(src / "dev.tsv")), src))
    test = with_sum_rows(read_manifest(str(src / "test_asr_wb.tsv")) + read_manifest(str(src / "test_asr_nb.tsv")),
                         src, keep=("sum",))
    write_tsv(data / "test_sum.tsv", test)
    write_tsv(data / "test_asr_wb.tsv", with_sum_rows(read_manifest(str(src / "test_asr_wb.tsv")), src,
                                                      keep=("asr",)))
    texts = sorted({r["tgt_text"] for r in train})
    config = yaml.safe_load((src / "config.yaml").read_text())
    config.update(build_vocab(texts, str(data), langs=["en", "es"], vocab_size=200, task_tokens=DECODER_ROUTES))
    config["smoe"] = {"encoder_routes": ["wb", "nb"], "decoder_routes": DECODER_ROUTES, "tasks": TASKS}
    (data / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return data


def run(cmd, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{log[-6000:]}"
    return log


@pytest.fixture(scope="module")
def trained(sum_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("third_route_run")
    log = run([
        BIN / "fairseq-train", sum_data, "--user-dir", PLUGIN, "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--arch", "s2t_encdec_smoe_xs", "--train-subset", "train",
        "--valid-subset", "dev", "--criterion", "label_smoothed_cross_entropy_asr_ctc", "--ctc-weight", "0.3",
        "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "3",
        "--max-sentences", "8", "--max-update", UPDATES, "--seed", "1", "--eval-max-len-b", "8",
        "--save-dir", work / "ckpt", "--cpu", "--num-workers", "0", "--log-format", "simple", "--log-interval", "1",
        "--no-epoch-checkpoints", "--validate-interval-updates", UPDATES,
    ], cwd=work)
    return sum_data, work, log


def test_the_config_alone_makes_a_three_route_task(sum_data):
    """The task reads the new route from config.yaml: the sum rows get decoder route 2, the <summarize> prefix, and
    are no ASR rows (no CTC loss, BLEU at validation)."""
    from fairseq_smoe.tasks.speech_to_text_smoe import SpeechToTextSMoETask

    parser = argparse.ArgumentParser()
    SpeechToTextSMoETask.add_args(parser)
    task = SpeechToTextSMoETask.setup_task(parser.parse_args([str(sum_data)]))
    task.load_dataset("train")
    table = task.routing_table
    assert table.decoder_routes == tuple(DECODER_ROUTES) and table.tasks == TASKS
    assert table.asr_decoder_routes().tolist() == [True, False, False]
    ds = task.datasets["train"]
    d = task.target_dictionary
    rows = {t: [i for i in range(len(ds)) if ds.tasks[i] == t] for t in TASKS}
    assert all(rows.values()) and len(rows["sum"]) == len(rows["asr"])
    assert {int(ds.decoder_routes[i]) for i in rows["sum"]} == {2}
    assert d.string(ds.prefixes[rows["sum"][0]]) == "<summarize> <lang:en>"
    assert d.index("<summarize>") in task.guiding_token_ids
    batch = ds.collater([ds[i] for i in rows["sum"][:2] + rows["asr"][:2] + rows["st"][:2]])
    plan = batch["net_input"]["route_plan"]
    assert plan.asr.tolist() == [t == "asr" for t in batch["tasks"]]
    assert sorted(plan.decoder.tolist()) == [0, 0, 1, 1, 2, 2]
    # homogeneous batches: one route pair each, six pairs (2 bandwidths x 3 tasks)
    batches = ds.batch_by_size(ds.ordered_indices(), max_sentences=8)
    pairs = [{(int(ds.encoder_routes[i]), int(ds.decoder_routes[i])) for i in b} for b in batches]
    assert all(len(p) == 1 for p in pairs) and len(set().union(*pairs)) == 6


def test_trains_and_validates_with_three_decoder_experts(trained):
    _, work, log = trained
    assert (work / "ckpt" / "checkpoint_last.pt").is_file()
    assert re.search(rf"num_updates {UPDATES}\b", log), log[-3000:]
    assert re.search(r"\| ctc_loss [\d.]+", log), log[-3000:]  # the asr batches got the CTC loss
    # dev has asr, st and sum rows: WER from the asr rows, BLEU from the st and sum rows
    valid = [line for line in log.splitlines() if "valid on 'dev' subset" in line]
    assert valid and re.search(r"\| wer [\d.]+( |$)", valid[-1]) and re.search(r"\| bleu [\d.]+( |$)", valid[-1]), log[-3000:]


def generate(data, work, subset, *extra):
    return run([
        BIN / "fairseq-generate", data, "--user-dir", PLUGIN, "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--gen-subset", subset, "--path", work / "ckpt" / "checkpoint_last.pt",
        "--max-tokens", "20000", "--beam", "2", "--max-len-b", "8", "--cpu", "--scoring", "sacrebleu", *extra,
    ], cwd=work)


def outputs(log, kind):
    return {int(m.group(1)): m.group(2) for m in re.finditer(rf"^{kind}-(\d+)\t(.*)$", log, re.M)}


def test_generate_decodes_the_new_route_without_guiding_tokens(trained):
    data, work, _ = trained
    log = generate(data, work, "test_sum")
    assert re.search(r"Generate test_sum with beam=2: BLEU = [\d.]+", log), log[-3000:]
    rows = read_manifest(str(data / "test_sum.tsv"))
    refs, hyps = outputs(log, "T"), outputs(log, "D")
    assert len(refs) == len(hyps) == len(rows)
    # the reference is the row's summary, without its <summarize> <lang:en> prefix
    assert sorted(refs.values()) == sorted(r["tgt_text"] for r in rows)
    assert not any(GUIDING.search(line) for line in log.splitlines() if line[:2] in ("H-", "D-", "T-"))
    # sum rows are no ASR rows: joint CTC/attention decoding leaves them to the decoder, hypothesis for hypothesis
    joint = generate(data, work, "test_sum", "--ctc-decode-weight", "0.5")
    assert outputs(joint, "D") == hyps


def test_checkpoint_loads_and_sum_rows_run_decoder_expert_2_only(trained):
    from fairseq import checkpoint_utils

    data, work, _ = trained
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(work / "ckpt" / "checkpoint_last.pt")], arg_overrides={"data": str(data)})
    model = models[0].eval()
    assert model.decoder.num_experts == 3 and model.encoder.num_experts == 2
    fc1 = [layer.fc1 for layer in model.decoder.layers]
    assert all(f.weight.shape[0] == 3 for f in fc1)
    assert task.routing_table.decoder_routes == tuple(DECODER_ROUTES)

    used = []
    handles = [f.register_forward_hook(lambda m, i, o: used.append(tuple(m.context.get().used_routes())))
               for f in fc1]

    def logits(subset):
        task.load_dataset(subset)
        ds = task.datasets[subset]
        sample = ds.collater([ds[i] for i in range(len(ds))])
        with torch.no_grad():
            out, _ = model(**sample["net_input"])
        return sample, out

    try:
        sample, before = logits("test_sum")
        assert set(sample["net_input"]["route_plan"].decoder.tolist()) == {2}
        assert used and set(used) == {(2,)}  # every decoder expert layer ran expert 2, and only it
        used.clear()
        asr_sample, asr_before = logits("test_asr_wb")
        assert set(used) == {(0,)}
    finally:
        for h in handles:
            h.remove()

    # expert 2's weights decide the sum rows' outputs and do not touch the transcribe rows'
    saved = [copy.deepcopy(f.weight.data[2]) for f in fc1]
    try:
        for f in fc1:
            f.weight.data[2].normal_()
        _, after = logits("test_sum")
        _, asr_after = logits("test_asr_wb")
    finally:
        for f, w in zip(fc1, saved):
            f.weight.data[2] = w
    assert not torch.allclose(before, after)
    assert torch.equal(asr_before, asr_after)
    assert np.isfinite(before.numpy()).all()


def test_vocab_cli_adds_the_guiding_token_of_every_decoder_route(tmp_path, capsys):
    from fairseq_smoe.data import vocab

    text = tmp_path / "text.txt"
    text.write_text("the cat sits on the mat\nel gato se sienta en la alfombra\nthe dog runs in the park\n")
    vocab.main(["--text", str(text), "--out-dir", str(tmp_path / "out"), "--langs", "en,es", "--vocab-size", "40",
                "--decoder-routes", ",".join(DECODER_ROUTES)])
    symbols = [line.split()[0] for line in (tmp_path / "out" / "spm.txt").read_text().splitlines()]
    assert symbols[:5] == ["<transcribe>", "<translate>", "<summarize>", "<lang:en>", "<lang:es>"]
    assert '"vocab_filename": "spm.txt"' in capsys.readouterr().out
