"""The learned-gate (switch) MoE baseline: routing, capacity, load-balancing loss, training through fairseq-train."""

import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairseq.models import ARCH_MODEL_REGISTRY

from fairseq_smoe.cli import params
from fairseq_smoe.modules.switch_layer import AuxLossCollector, SwitchLinear, SwitchState
from fairseq_smoe.routing import RoutingTable
from fairseq_smoe.tasks.dictionary_only import DictionaryOnlyTask

PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_smoe"
BIN = Path(sys.executable).parent


def switch_ffn(d=4, ffn=6, experts=2, capacity=1.25, eval_capacity=2.0):
    state = SwitchState(experts, capacity, eval_capacity, AuxLossCollector())
    fc1 = SwitchLinear(d, ffn, state, "fc1", d)
    fc2 = SwitchLinear(ffn, d, state, "fc2", d)
    return state, fc1, fc2


def run_ffn(fc1, fc2, x):
    return fc2(torch.relu(fc1(x)))


def reference(fc1, fc2, x):
    """Every token through its argmax expert, scaled by the router probability (no capacity, no padding)."""
    flat = x.reshape(-1, x.size(-1))
    probs = torch.softmax(flat @ fc1.gate.weight.T, dim=-1)
    out = torch.empty(flat.size(0), fc2.out_features)
    for i, tok in enumerate(flat):
        e = int(probs[i].argmax())
        h = torch.relu(tok @ fc1.weight[e].T + fc1.bias[e])
        out[i] = (h @ fc2.weight[e].T + fc2.bias[e]) * probs[i, e]
    return out.view(*x.shape[:-1], -1), probs


def test_each_token_takes_its_argmax_expert_scaled_by_its_router_probability():
    torch.manual_seed(0)
    state, fc1, fc2 = switch_ffn(experts=3)
    fc1.eval(), fc2.eval()
    x = torch.randn(5, 3, 4)
    with state.collector.collect():
        y = run_ffn(fc1, fc2, x)
    ref, probs = reference(fc1, fc2, x)
    assert len(set(probs.argmax(-1).tolist())) > 1  # the test really mixes experts
    assert torch.allclose(y, ref, atol=1e-6)


def test_tokens_over_capacity_and_padding_skip_the_ffn():
    torch.manual_seed(0)
    state, fc1, fc2 = switch_ffn(capacity=0.5)
    with torch.no_grad():
        fc1.gate.weight.zero_()
        fc1.gate.weight[0, 0] = 10.0  # every token with x[..., 0] > 0 goes to expert 0, others to expert 1
    fc1.train(), fc2.train()
    T, B = 6, 2
    x = torch.randn(T, B, 4)
    x[..., 0] = 1.0  # all tokens want expert 0
    state.padding_mask = torch.zeros(B, T, dtype=torch.bool)
    state.padding_mask[1, 4:] = True  # row 1 has 4 real frames: 10 real tokens in all
    with state.collector.collect() as records:
        y = run_ffn(fc1, fc2, x)
    capacity = math.ceil(0.5 * 10 / 2)  # 3 tokens for expert 0
    assert state.capacity(10, training=True) == capacity
    ref, _ = reference(fc1, fc2, x)
    # the first `capacity` real tokens in sequence order (T-major, as fairseq's layout) are computed
    real = [(t, b) for t in range(T) for b in range(B) if not state.padding_mask[b, t]]
    kept = set(real[:capacity])
    for t in range(T):
        for b in range(B):
            if (t, b) in kept:
                assert torch.allclose(y[t, b], ref[t, b], atol=1e-6)
            else:
                assert torch.equal(y[t, b], torch.zeros(4)), (t, b)
    (record,) = records
    assert record["dropped"].item() == pytest.approx(1 - capacity / 10)
    # all 10 real tokens chose expert 0: f = [1, 0]; aux = E * P_0, with P_0 the mean probability over real tokens
    p0 = torch.softmax(x.reshape(-1, 4) @ fc1.gate.weight.T, -1)[:, 0]
    real_mask = ~state.padding_mask.T.reshape(-1)
    assert record["aux_loss"].item() == pytest.approx(2 * p0[real_mask].mean().item(), rel=1e-5)


def test_eval_capacity_factor_keeps_every_token_of_two_experts():
    state, fc1, fc2 = switch_ffn(capacity=0.5, eval_capacity=2.0)
    assert state.capacity(10, training=False) == 10 and state.capacity(10, training=True) == 3


def test_balanced_routing_gives_aux_loss_one_and_the_router_learns():
    torch.manual_seed(0)
    state, fc1, fc2 = switch_ffn()
    with torch.no_grad():
        fc1.gate.weight.zero_()  # uniform probabilities: P_e = 1/2 whatever f_e is
    with state.collector.collect() as records:
        run_ffn(fc1, fc2, torch.randn(4, 2, 4)).sum().backward()
    assert records[0]["aux_loss"].item() == pytest.approx(1.0)
    assert fc1.gate.weight.grad is not None and fc1.gate.weight.grad.abs().sum() > 0
    # without a collecting criterion (inference), nothing is recorded
    assert state.collector.records is None


def test_bad_switch_settings_are_refused():
    with pytest.raises(ValueError, match="at least 2 experts"):
        SwitchState(1, 1.0, 1.0)
    with pytest.raises(ValueError, match="capacity factors must be > 0"):
        SwitchState(2, 0.0, 1.0)


def build(arch, **overrides):
    args = params.model_args(arch, RoutingTable(), dict(dropout=0.0, **overrides))
    return ARCH_MODEL_REGISTRY[arch].build_model(args, DictionaryOnlyTask(60)), args


def test_model_has_as_many_experts_as_routes_and_reports_one_record_per_switch_layer():
    model, args = build("s2t_encdec_lmoe_xs")
    assert (args.encoder_experts, args.decoder_experts) == (2, 2)
    fc1s = [m for m in model.modules() if isinstance(m, SwitchLinear) and m.role == "fc1"]
    assert len(fc1s) == args.encoder_layers + args.decoder_layers == 9
    B, T, U = 3, 40, 5
    src, lengths = torch.randn(B, T, 80), torch.tensor([40, 30, 20])
    prev = torch.randint(4, 60, (B, U))
    x, extra = model(src, lengths, prev, encoder_route_ids=torch.zeros(B, dtype=torch.long))
    assert x.shape == (B, U, 60)
    records = extra["moe_router_stats"]
    assert len(records) == 9
    assert all(1.0 - 1e-4 <= r["aux_loss"].item() <= 2.0 + 1e-4 for r in records)  # between balanced and collapsed
    dec_only, a = build("s2t_dec_lmoe_xs")
    assert a.encoder_experts == 1 and a.decoder_experts == 2
    assert sum(isinstance(m, SwitchLinear) for m in dec_only.modules()) == 2 * a.decoder_layers


def test_paper_size_counts_one_expert_per_ffn_plus_routers():
    lmoe = params.count(params.build("s2t_encdec_lmoe", 40000))
    smoe = params.count(params.build("s2t_encdec_smoe", 40000))
    base = params.count(params.build("s2t_smoe_base", 40000))
    routers = (12 + 6) * 2 * 512  # one 512 x 2 router per FFN
    assert lmoe["total"] == smoe["total"] + routers
    assert lmoe["active"] == {"top-1": base["total"] + routers}


def test_plain_criterion_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        build("s2t_encdec_lmoe_xs", criterion="label_smoothed_cross_entropy")
    assert "does not optimise the switch load-balancing loss" in caplog.text


def run(cmd, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{log[-6000:]}"
    return log


def test_trains_with_fairseq_train_logs_aux_loss_and_decodes(corpus_dir, tmp_path):
    updates = 24
    log = run([
        str(BIN / "fairseq-train"), str(corpus_dir), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--arch", "s2t_encdec_lmoe_xs",
        "--train-subset", "train", "--valid-subset", "dev",
        "--criterion", "label_smoothed_cross_entropy_moe", "--label-smoothing", "0.1", "--moe-loss-coef", "0.01",
        "--moe-capacity-factor", "1.0",
        "--optimizer", "adam", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
        "--clip-norm", "10", "--max-sentences", "8", "--max-update", str(updates), "--seed", "1",
        "--save-dir", str(tmp_path / "ckpt"), "--cpu", "--num-workers", "0", "--log-format", "simple",
        "--log-interval", "1", "--no-epoch-checkpoints", "--no-eval-scores",
    ], cwd=tmp_path)
    assert "does not optimise" not in log
    inner = re.findall(r"train_inner \| .*? loss=([\d.]+), nll_loss=[\d.]+, moe_aux=([\d.]+), moe_dropped=([\d.]+)",
                       log)
    assert len(inner) == updates, log[-3000:]
    losses = [float(x[0]) for x in inner]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    aux = [float(x[1]) for x in inner]
    assert all(1.0 <= a <= 2.0 for a in aux), aux  # E * sum f*P lies in [1, E]
    # capacity factor 1.0 with unbalanced routers drops some tokens in training; the eval factor 2.0 none
    assert max(float(x[2]) for x in inner) > 0
    assert re.search(r"valid on 'dev' subset \|.* moe_aux [\d.]+ \| moe_dropped 0 \|", log), log[-2000:]
    out = run([
        str(BIN / "fairseq-generate"), str(corpus_dir), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--gen-subset", "test_st_nb", "--path",
        str(tmp_path / "ckpt" / "checkpoint_last.pt"), "--max-tokens", "20000", "--beam", "3", "--max-len-b", "20",
        "--cpu", "--scoring", "sacrebleu",
    ], cwd=tmp_path)
    assert re.search(r"Generate test_st_nb with beam=3: BLEU = [\d.]+", out), out[-2000:]
    assert len(re.findall(r"^D-\d+\t", out, re.M)) == 8
