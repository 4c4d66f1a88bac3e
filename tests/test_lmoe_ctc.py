"""The learned-gate model trained and decoded like the S-MoE systems of the study: CE + CTC on ASR rows + the switch
balancing loss (``label_smoothed_cross_entropy_moe_asr_ctc``), upcycled from a dense Base trained with CTC, decoded
with joint CTC/attention search and greedy CTC.

Unit checks on test_dataset's 5-row corpus (3 ASR, 2 ST rows); the end-to-end run on tests/data/pre_move's 8
utterances (ASR/ST x NB/WB) at test_upcycle's tiny size.
"""

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fairseq_smoe  # noqa: F401  (registers the plugin, installs the checkpoint allow-list)
from fairseq import checkpoint_utils
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.modules.fairseq_dropout import FairseqDropout

from fairseq_smoe.cli import params
from fairseq_smoe.cli import upcycle as up
from fairseq_smoe.criterions.label_smoothed_cross_entropy_asr_ctc import LabelSmoothedCrossEntropyAsrCtcCriterion
from fairseq_smoe.criterions.label_smoothed_cross_entropy_moe import LabelSmoothedCrossEntropyMoECriterion
from fairseq_smoe.criterions.label_smoothed_cross_entropy_moe_asr_ctc import (
    LabelSmoothedCrossEntropyMoEAsrCtcCriterion,
)
from fairseq_smoe.decoding.joint_ctc import ctc_log_probs
from fairseq_smoe.models import s2t_lmoe
from fairseq_smoe.models.s2t_smoe import ENCODER_OUT_KEY
from fairseq_smoe.routing import RoutingTable
from fairseq_smoe.study import ctc_greedy
from test_dataset import ROWS, make_task, write_corpus
from test_upcycle import DATA, TINY, load, whole_test_set
from test_upcycle import make_task as make_generation_task
from test_validation_logging import build as build_small, layout, rows_of

PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_smoe"
BIN = Path(sys.executable).parent
CRITERION = s2t_lmoe.MOE_ASR_CTC_CRITERION


# ------------------------------------------------------------------------------------------------- unit checks
def build(task, arch="s2t_encdec_lmoe_xs", ctc_weight=0.5, **overrides):
    torch.manual_seed(0)
    args = params.model_args(arch, RoutingTable(), {"ctc_weight": ctc_weight, **overrides})
    model = params.ARCH_MODEL_REGISTRY[arch].build_model(args, task)
    for m in model.modules():  # training mode (training capacity, drops) but deterministic
        if isinstance(m, FairseqDropout):
            m.p = 0.0
    return model.train()


@pytest.fixture(scope="module")
def task_and_batch(tmp_path_factory):
    task = make_task(write_corpus(tmp_path_factory.mktemp("lmoe_ctc"), ROWS))
    task.load_dataset("train")
    ds = task.datasets["train"]
    return task, ds.collater([ds[i] for i in range(len(ds))])


def test_registered_with_both_flags():
    assert CRITERION == "label_smoothed_cross_entropy_moe_asr_ctc"
    assert CRITERION_REGISTRY[CRITERION] is LabelSmoothedCrossEntropyMoEAsrCtcCriterion
    assert CRITERION in s2t_lmoe.BALANCING_CRITERIA


def test_loss_is_ce_plus_ctc_plus_balancing_term_of_the_two_criteria(task_and_batch):
    task, batch = task_and_batch
    model = build(task)
    assert model.encoder.ctc_proj is not None
    W, C = 0.5, 0.01
    both = LabelSmoothedCrossEntropyMoEAsrCtcCriterion(task, False, 0.1, ctc_weight=W, moe_loss_coef=C)
    ctc_only = LabelSmoothedCrossEntropyAsrCtcCriterion(task, False, 0.1, ctc_weight=W)
    moe_only = LabelSmoothedCrossEntropyMoECriterion(task, False, 0.1, moe_loss_coef=C)
    loss, sample_size, log = both(model, batch)
    loss_ctc, _, log_ctc = ctc_only(model, batch)
    loss_moe, _, log_moe = moe_only(model, batch)
    with torch.no_grad():
        net_output = model(**batch["net_input"])
        ce = float(both.compute_loss(model, net_output, batch)[0])
    assert ENCODER_OUT_KEY in net_output[1]  # the lmoe forward hands the CTC criterion its encoder output
    ctc = float(log_ctc["ctc_loss"])
    aux = float(log_moe["moe_aux"]) / sample_size  # logged times sample_size
    assert sample_size == batch["ntokens"] and log_ctc["ctc_rows"] == 3 and ctc > 0
    assert 1.0 <= aux <= 2.0  # E * sum f * P lies in [1, E] for E = 2
    # each term as the existing criteria compute it
    assert float(loss_ctc) == pytest.approx(ce + W * ctc, rel=1e-6)
    assert float(loss_moe) == pytest.approx(ce + C * sample_size * aux, rel=1e-6)
    assert float(loss) == pytest.approx(ce + W * ctc + C * sample_size * aux, rel=1e-6)
    assert float(loss) == pytest.approx(float(loss_ctc) + float(loss_moe) - ce, rel=1e-6)
    # and it logs what both log
    assert float(log["ctc_loss"]) == pytest.approx(ctc, rel=1e-6) and log["ctc_rows"] == 3
    assert float(log["moe_aux"]) == pytest.approx(float(log_moe["moe_aux"]), rel=1e-6)
    assert float(log["moe_dropped"]) == pytest.approx(float(log_moe["moe_dropped"]), rel=1e-6)
    assert float(log["moe_dropped"]) > 0  # capacity 1.25 in training drops tokens of an unbalanced router
    # one backward reaches the CTC head (the CTC term) and every router (CE through the router probabilities,
    # the balancing term)
    loss.backward()
    assert float(model.encoder.ctc_proj.weight.grad.abs().sum()) > 0
    gates = [m.gate.weight for m in model.modules() if isinstance(m, s2t_lmoe.SwitchLinear) and m.role == "fc1"]
    assert len(gates) == 9 and all(float(g.grad.abs().sum()) > 0 for g in gates)


def test_without_switch_layers_it_is_the_asr_ctc_criterion(task_and_batch):
    task, batch = task_and_batch
    model = build(task, arch="s2t_encdec_smoe_xs")
    both = LabelSmoothedCrossEntropyMoEAsrCtcCriterion(task, False, 0.1, ctc_weight=0.5, moe_loss_coef=0.01)
    ctc_only = LabelSmoothedCrossEntropyAsrCtcCriterion(task, False, 0.1, ctc_weight=0.5)
    with torch.no_grad():
        loss, _, log = both(model, batch)
        want, _, want_log = ctc_only(model, batch)
    assert float(loss) == float(want)
    assert "moe_aux" not in log and float(log["ctc_loss"]) == float(want_log["ctc_loss"])


def test_bad_settings_are_clear_errors(task_and_batch, caplog):
    task, batch = task_and_batch
    with pytest.raises(ValueError, match="--ctc-weight must be > 0"):
        LabelSmoothedCrossEntropyMoEAsrCtcCriterion(task, False, 0.1, ctc_weight=0.0)
    with pytest.raises(ValueError, match="--moe-loss-coef must be >= 0, got -0.1"):
        LabelSmoothedCrossEntropyMoEAsrCtcCriterion(task, False, 0.1, ctc_weight=0.5, moe_loss_coef=-0.1)
    crit = LabelSmoothedCrossEntropyMoEAsrCtcCriterion(task, False, 0.1, ctc_weight=0.5)
    no_head = build(task, ctc_weight=0.0)
    assert no_head.encoder.ctc_proj is None
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=rf"--criterion {CRITERION} needs a model with a CTC projection"):
            crit(no_head, batch)
    # the new criterion optimises the balancing loss: no warning; the asr_ctc one does not: warned
    with caplog.at_level(logging.WARNING):
        build(task, criterion=CRITERION)
        assert "does not optimise the switch load-balancing loss" not in caplog.text
        build(task, criterion="label_smoothed_cross_entropy_asr_ctc")
    assert "does not optimise the switch load-balancing loss" in caplog.text
    assert CRITERION in caplog.text  # the warning names the criterion to use


@pytest.fixture(scope="module")
def validating_task(tmp_path_factory):
    """test_validation_logging's task: the 5-row corpus with validation decoding (WER/BLEU) on."""
    t = make_task(write_corpus(tmp_path_factory.mktemp("lmoe_ctc_valid"), ROWS), "--eval-max-len-b", "5")
    t.load_dataset("train")
    return t


def test_validation_batches_of_either_task_log_the_same_keys(validating_task):
    """The contract of test_validation_logging (one flat all-reduce buffer across ranks): an ST batch logs
    ``ctc_loss`` (zero, no rows) and the balancing keys like an ASR batch."""
    task = validating_task
    model = build_small(task, "s2t_encdec_lmoe_xs")
    criterion = LabelSmoothedCrossEntropyMoEAsrCtcCriterion(task, False, 0.1, ctc_weight=0.3)
    _, _, asr_log = task.valid_step(rows_of(task, "asr"), model, criterion)
    _, _, st_log = task.valid_step(rows_of(task, "st"), model, criterion)
    assert layout(asr_log) == layout(st_log)
    assert {"ctc_loss", "ctc_rows", "moe_aux", "moe_dropped"} <= set(asr_log)
    assert asr_log["ctc_rows"] == 3 and st_log["ctc_rows"] == 0 and float(st_log["ctc_loss"]) == 0.0


# ------------------------------------------------------------------------------------------------- end to end
def run(cmd, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{log[-6000:]}"
    return log


def train_cmd(data, save, arch, *extra):
    return [BIN / "fairseq-train", data, "--user-dir", PLUGIN, "--task", "speech_to_text_smoe", "--config-yaml",
            "config.yaml", "--arch", arch, *extra, "--label-smoothing", "0.1", "--train-subset", "train",
            "--disable-validation", "--optimizer", "adam", "--lr", "1e-3", "--max-sentences", "4", "--seed", "1",
            "--save-dir", save, "--cpu", "--num-workers", "0", "--no-epoch-checkpoints", "--log-format", "simple",
            "--log-interval", "1"]


def test_dense_ctc_base_upcycled_to_lmoe_trains_with_ctc_and_decodes_joint(tmp_path, capsys):
    # pre_move's 8 utterances as train; its 4 ASR rows as an ASR test manifest
    data = tmp_path / "data"
    shutil.copytree(DATA, data, ignore=shutil.ignore_patterns("*.pt", "expected.json", "make.py"))
    rows = (data / "test.tsv").read_text(encoding="utf-8").splitlines()
    shutil.copyfile(data / "test.tsv", data / "train.tsv")
    task_col = rows[0].split("\t").index("task")
    asr = [r for r in rows[1:] if r.split("\t")[task_col] == "asr"]
    assert len(asr) == 4
    (data / "test_asr.tsv").write_text("\n".join([rows[0], *asr]) + "\n", encoding="utf-8")

    # 1. the dense Base, trained with the auxiliary CTC loss (as the study's trunk)
    dense_dir = tmp_path / "dense"
    run(train_cmd(data, dense_dir, "s2t_smoe_base_xs", *TINY, "--criterion", "label_smoothed_cross_entropy_asr_ctc",
                  "--ctc-weight", "0.5", "--max-update", "2"), tmp_path)
    dense = dense_dir / "checkpoint_last.pt"

    # 2. upcycled into the learned-gate system: the CTC head comes along
    out = tmp_path / "lmoe_upcycled.pt"
    assert up.main(["--dense", str(dense), "--arch", "s2t_encdec_lmoe_xs", "--data", str(data),
                    "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    flags = re.search(r"--arch s2t_encdec_lmoe_xs (.*?) --criterion", printed).group(1).split()
    src = checkpoint_utils.load_checkpoint_to_cpu(str(dense))["model"]
    got = checkpoint_utils.load_checkpoint_to_cpu(str(out))["model"]
    for key in ("encoder.ctc_proj.weight", "encoder.ctc_proj.bias"):
        assert torch.equal(got[key], src[key]), key
    # at step 0 (evaluation) the upcycled encoder and CTC head give the dense model's CTC posteriors
    gen_task = make_generation_task(data)
    net_input = {k: v for k, v in whole_test_set(gen_task)["net_input"].items() if k != "prev_output_tokens"}
    with torch.no_grad():
        (want, want_len), (have, have_len) = [ctc_log_probs(m.encoder, m.encoder(**net_input))
                                              for m in (load(dense, gen_task), load(out, gen_task))]
    assert torch.equal(want_len, have_len)
    real = torch.arange(want.size(0)).unsqueeze(1) < want_len.unsqueeze(0)  # T x B (padded frames skip the experts)
    assert (want - have).abs()[real].max().item() <= 1e-5

    # 3. continued with CE + CTC + balancing loss: all three logged, finite
    save = tmp_path / "lmoe"
    log = run(train_cmd(data, save, "s2t_encdec_lmoe_xs", *flags, "--criterion", CRITERION, "--ctc-weight", "0.5",
                        "--moe-loss-coef", "0.01", "--max-update", "4", "--finetune-from-model", out), tmp_path)
    assert f"loading pretrained model from {out}" in log
    assert "does not optimise" not in log
    inner = [line for line in log.splitlines() if "train_inner |" in line]
    assert len(inner) == 4, log[-3000:]
    for key in ("loss", "ctc_loss", "moe_aux", "moe_dropped"):
        found = [re.search(rf"\b{key}=([-\d.e+inf]+)", line) for line in inner]
        # batches are route-homogeneous: an ST batch (2 of the 4) has no ASR row, hence no CTC loss to log
        assert sum(map(bool, found)) == (2 if key == "ctc_loss" else 4), (key, inner)
        values = [float(m.group(1)) for m in found if m]
        assert all(math.isfinite(v) for v in values), (key, values)
    assert all(1.0 <= float(re.search(r"moe_aux=([\d.]+)", line).group(1)) <= 2.0 for line in inner)
    ckpt = save / "checkpoint_last.pt"
    state = checkpoint_utils.load_checkpoint_to_cpu(str(ckpt))
    assert state["optimizer_history"][-1]["num_updates"] == 4
    assert not torch.equal(state["model"]["encoder.ctc_proj.weight"], got["encoder.ctc_proj.weight"])  # trained

    # 4. fairseq-generate with joint CTC/attention decoding on the ASR test set: every row decoded, and the CTC
    # head is really used (its scores differ from attention-only decoding)
    joint = generate_asr(data, ckpt, tmp_path / "gen_joint", "--ctc-decode-weight", "0.3")
    plain = generate_asr(data, ckpt, tmp_path / "gen_plain")
    assert sorted(joint) == sorted(plain) and len(joint) == 4
    assert any(joint[k]["score"] != pytest.approx(plain[k]["score"], abs=1e-4) for k in joint)

    # 5. greedy CTC decoding of the same set (python -m fairseq_smoe.study.ctc_greedy)
    tsv = tmp_path / "ctc_greedy.tsv"
    ctc_greedy.main(["--path", str(ckpt), "--data", str(data), "--subset", "test_asr", "--cpu", "--out", str(tsv)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and math.isfinite(result["wer"]) and math.isfinite(result["cer"])
    assert len(tsv.read_text(encoding="utf-8").splitlines()) == 4


def generate_asr(data: Path, ckpt: Path, out_dir: Path, *extra) -> dict:
    """fairseq-generate (the CLI, its own process) on test_asr: id -> {tokens, score}."""
    run([BIN / "fairseq-generate", data, "--user-dir", PLUGIN, "--task", "speech_to_text_smoe", "--config-yaml",
         "config.yaml", "--gen-subset", "test_asr", "--path", ckpt, "--max-tokens", "20000", "--beam", "3",
         "--max-len-b", "20", "--cpu", "--results-path", out_dir, *extra], out_dir.parent)
    text = (out_dir / "generate-test_asr.txt").read_text(encoding="utf-8")
    return {m.group(1): {"score": float(m.group(2)), "tokens": m.group(3)}
            for m in re.finditer(r"^H-(\d+)\t(\S+)\t(.*)$", text, re.M)}
