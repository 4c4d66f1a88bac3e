"""``--checkpoint-activations``: the decoder layers' recomputation inside backward() sees the routes of the forward
it repeats, so training computes the same gradients as without checkpointing, for S-MoE (one-route and mixed
batches) and for the learned gate (whose router statistics are recorded once and keep their gradient)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fairseq.models import ARCH_MODEL_REGISTRY

from fairseq_smoe.cli import params
from fairseq_smoe.criterions.label_smoothed_cross_entropy_moe import LabelSmoothedCrossEntropyMoECriterion
from fairseq_smoe.models.s2t_lmoe import AUX_KEY

BIN = Path(sys.executable).parent
PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_smoe"


@pytest.fixture(scope="module")
def task(train_task):
    return train_task


def batches(task, kind: str, n: int = 3):
    """``n`` collated batches of 4: each of one route pair (nb, translate), or of all four route pairs."""
    ds = task.datasets["train"]
    enc, dec = ds.encoder_routes, ds.decoder_routes
    out = []
    for step in range(n):
        if kind == "mixed":
            idx = [int(np.flatnonzero((enc == e) & (dec == d))[step]) for e in (0, 1) for d in (0, 1)]
        else:
            idx = [int(i) for i in np.flatnonzero((enc == 1) & (dec == 1))[4 * step:4 * step + 4]]
        out.append(in_double(ds.collater([ds[i] for i in idx])))
    return out


def build(task, arch, checkpoint: bool):
    """In float64, so that the sums the two runs add up in different orders agree far below the 1e-6 checked."""
    torch.manual_seed(0)
    args = params.model_args(arch, task.routing_table, dict(dropout=0.0, checkpoint_activations=checkpoint))
    return ARCH_MODEL_REGISTRY[arch].build_model(args, task).double()


def in_double(sample):
    net_input = dict(sample["net_input"], src_tokens=sample["net_input"]["src_tokens"].double())
    return dict(sample, net_input=net_input)


def train(model, task, samples):
    """SGD steps; per step: the loss, the gradients, and the number of router records (learned gate)."""
    criterion = LabelSmoothedCrossEntropyMoECriterion(task, False, 0.1, moe_loss_coef=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    records = []
    original_forward = model.forward

    def forward(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        records.append(len(out[1].get(AUX_KEY) or []))
        return out

    model.forward = forward
    steps = []
    for sample in samples:
        optimizer.zero_grad()
        loss, _, log = criterion(model, sample)
        loss.backward()
        steps.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, log.get("moe_aux")))
        optimizer.step()
    return steps, records


def recomputations(model):
    """Counts the calls of the first decoder layer's fc1: 2 per step when the layer is checkpointed."""
    calls = []
    model.decoder.layers[0].fc1.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("arch,kind", [("s2t_encdec_smoe_xs", "one_route"), ("s2t_encdec_smoe_xs", "mixed"),
                                       ("s2t_encdec_lmoe_xs", "mixed")])
def test_checkpointed_training_computes_the_same_gradients(task, arch, kind):
    plain, checkpointed = build(task, arch, False), build(task, arch, True)
    assert all(hasattr(layer, "precheckpoint_forward") for layer in checkpointed.decoder.layers)
    assert not any(hasattr(layer, "precheckpoint_forward") for layer in plain.decoder.layers)
    # the same parameters under the same names: checkpoints load across the option
    assert list(plain.state_dict()) == list(checkpointed.state_dict())
    checkpointed.load_state_dict(plain.state_dict())
    samples = batches(task, kind)
    calls_plain, calls_checkpointed = recomputations(plain), recomputations(checkpointed)
    ref, ref_records = train(plain, task, samples)
    got, got_records = train(checkpointed, task, samples)
    assert len(calls_plain) == 3 and len(calls_checkpointed) == 6  # recomputed in each backward
    for step, ((loss_a, grads_a, aux_a), (loss_b, grads_b, aux_b)) in enumerate(zip(ref, got)):
        assert abs(loss_a - loss_b) <= 1e-6, (step, loss_a, loss_b)
        for name, g in grads_a.items():
            assert torch.allclose(g, grads_b[name], rtol=0, atol=1e-6), (step, name, (g - grads_b[name]).abs().max())
        if arch.endswith("lmoe_xs"):
            assert abs(float(aux_a) - float(aux_b)) <= 1e-5, (step, aux_a, aux_b)
    if arch.endswith("lmoe_xs"):
        # one record per switch layer (6 encoder + 3 decoder), none added twice by the recomputation, and the
        # decoder routers' gradients include the aux loss's (checked against the uncheckpointed model above)
        assert ref_records == got_records == [9, 9, 9]
        gate = "decoder.layers.0.fc1.gate.weight"
        assert grads_b[gate].abs().sum() > 0


def test_checkpointed_layers_decode_like_plain_ones(task):
    """Inference goes through the checkpointed forward too (incremental decoding, no autograd)."""
    from fairseq.sequence_generator import SequenceGenerator

    plain, checkpointed = build(task, "s2t_encdec_smoe_xs", False), build(task, "s2t_encdec_smoe_xs", True)
    checkpointed.load_state_dict(plain.state_dict())
    sample = batches(task, "mixed", 1)[0]
    net_input = {k: v for k, v in sample["net_input"].items() if k != "prev_output_tokens"}
    out = []
    for model in (plain, checkpointed):
        model.eval()
        gen = SequenceGenerator([model], task.target_dictionary, beam_size=2, max_len_a=0, max_len_b=5)
        with torch.no_grad():
            out.append([h[0]["tokens"].tolist() for h in gen.generate([model], {"net_input": net_input})])
    assert out[0] == out[1]


def run(cmd, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{log[-6000:]}"
    return log


@pytest.mark.parametrize("arch,criterion", [("s2t_encdec_smoe_xs", "label_smoothed_cross_entropy"),
                                            ("s2t_encdec_lmoe_xs", "label_smoothed_cross_entropy_moe")])
def test_fairseq_train_with_checkpoint_activations_runs_updates(corpus_dir, tmp_path, arch, criterion):
    updates = 3
    log = run([
        str(BIN / "fairseq-train"), str(corpus_dir), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--arch", arch, "--checkpoint-activations",
        "--train-subset", "train", "--valid-subset", "dev", "--criterion", criterion, "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "1e-3", "--max-sentences", "8", "--max-update", str(updates),
        "--seed", "1", "--save-dir", str(tmp_path / "ckpt"), "--cpu", "--num-workers", "0",
        "--log-format", "simple", "--log-interval", "1", "--no-epoch-checkpoints", "--disable-validation",
    ], cwd=tmp_path)
    assert len(re.findall(r"train_inner \| .*? loss=[\d.]+", log)) == updates, log[-3000:]
    assert "'checkpoint_activations': True" in log or "checkpoint_activations=True" in log, log[:3000]
    saved = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert any(k.startswith("decoder.layers.0.fc1") for k in saved["model"])
