"""Joint CTC/attention decoding: the CTC prefix scores against brute force over every alignment, and the beam
search's scores against the model's own CTC and decoder probabilities of the hypotheses it returns."""

import itertools
import json
import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fairseq_smoe.decoding.ctc_prefix_score import CtcPrefixScorer
from fairseq_smoe.decoding.joint_ctc import JointCtcAttentionEnsemble
from test_ctc import batch_of, build
from test_dataset import ROWS, make_task, write_corpus

BLANK = 0


def collapse(path):
    return [k for k, _ in itertools.groupby(path) if k != BLANK]


def brute_force(x, length, prefix, complete=False):
    """log of the summed probability of every alignment whose labels start with (or, complete: are) ``prefix``."""
    V = x.size(-1)
    total = []
    for path in itertools.product(range(V), repeat=length):
        labels = collapse(path)
        if (labels == prefix) if complete else (labels[: len(prefix)] == prefix):
            total.append(sum(float(x[t, v]) for t, v in enumerate(path)))
    return torch.logsumexp(torch.tensor(total, dtype=torch.float64), 0).item() if total else -math.inf


@pytest.fixture()
def frames():
    torch.manual_seed(3)
    T, N, V = 5, 2, 4
    return torch.randn(T, N, V).log_softmax(-1), torch.tensor([5, 3])  # row 1 has two padded frames


@pytest.mark.parametrize("prefix", [[], [1], [2, 2], [1, 3, 1], [3, 3, 3]])
def test_prefix_and_final_scores_match_brute_force(frames, prefix):
    x, lengths = frames
    scorer = CtcPrefixScorer(x, lengths, BLANK)
    for c in prefix:  # extend both rows token by token, as beam search does
        scorer.score(torch.tensor([[1, 2, 3], [1, 2, 3]]))
        scorer.advance(torch.tensor([c, c]))
    for row in range(2):
        L = int(lengths[row])
        assert scorer.psi[row].item() == pytest.approx(brute_force(x[:, row], L, prefix) if prefix else 0.0, abs=1e-4)
        expected = brute_force(x[:, row], L, prefix, complete=True)
        assert scorer.final_score()[row].item() == pytest.approx(expected, abs=1e-4)
        if prefix:  # and the full-sequence score is torch's CTC
            nll = F.ctc_loss(x[:L, row : row + 1], torch.tensor([prefix]), torch.tensor([L]), torch.tensor([len(prefix)]),
                             blank=BLANK, reduction="sum")
            assert scorer.final_score()[row].item() == pytest.approx(-nll.item(), abs=1e-4)


def test_candidates_not_chosen_and_reordering(frames):
    x, lengths = frames
    scorer = CtcPrefixScorer(x, lengths, BLANK)
    psi = scorer.score(torch.tensor([[1, 2], [3, 1]]))
    assert psi[0, 1].item() == pytest.approx(brute_force(x[:, 0], 5, [2]), abs=1e-4)
    # a token that was not a candidate (a forced guiding token) leaves the prefix as it was
    scorer.advance(torch.tensor([7, 1]))
    assert scorer.psi[0].item() == 0.0 and scorer.psi[1].item() == pytest.approx(brute_force(x[:, 1], 3, [1]), abs=1e-4)
    # beam reordering: rows swap (and one is duplicated) with their frames and states
    scorer.index_select(torch.tensor([1, 1, 0]))
    scorer.score(torch.tensor([[2], [1], [3]]))
    scorer.advance(torch.tensor([2, 1, 3]))
    assert scorer.psi[0].item() == pytest.approx(brute_force(x[:, 1], 3, [1, 2]), abs=1e-4)
    assert scorer.psi[1].item() == pytest.approx(brute_force(x[:, 1], 3, [1, 1]), abs=1e-4)
    assert scorer.psi[2].item() == pytest.approx(brute_force(x[:, 0], 5, [3]), abs=1e-4)


def held_storages(scorer):
    """Bytes of each distinct tensor storage the scorer holds, by address."""
    return {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
            for v in vars(scorer).values() if isinstance(v, torch.Tensor)}


def test_the_frames_are_kept_once_per_source_utterance_not_per_hypothesis():
    """T x B x V once (the caller's tensor, not a copy), however many hypothesis rows there are and however
    often they are reordered; per row only T x 2 x (K + 1) states."""
    torch.manual_seed(0)
    T, B, V, beam, K = 30, 3, 400, 5, 4
    x = torch.randn(T, B, V).log_softmax(-1)
    scorer = CtcPrefixScorer(x, torch.tensor([30, 20, 25]), BLANK)
    scorer.index_select(torch.arange(B).repeat_interleave(beam))
    N = B * beam
    for step in range(3):
        scorer.score(torch.randint(1, V, (N, K)))
        scorer.advance(scorer.cand[:, 0])
        scorer.index_select(torch.randperm(N))
    per_source = T * B * V * 4
    per_row = T * N * V * 4  # what a copy per hypothesis row would take
    held = held_storages(scorer)
    assert per_source <= sum(held.values()) < per_source + per_row // 10
    assert x.untyped_storage().data_ptr() in held  # the caller's tensor itself


@pytest.fixture()
def task_and_model(tmp_path):
    task = make_task(write_corpus(tmp_path, ROWS))
    task.load_dataset("train")
    return task, build(task)


def hypothesis_scores(task, model, sample, row, hypo):
    """The model's own log-probabilities of a hypothesis of batch row ``row``: the decoder's (teacher forced) and
    CTC's, both from the batch's encoder output (as beam search sees it, padding included)."""
    tokens = hypo["tokens"]  # guiding prefix, output tokens, </s>
    d = task.tgt_dict
    with torch.no_grad():
        enc = model.encoder(**{k: v for k, v in sample["net_input"].items() if k != "prev_output_tokens"})
        enc = model.encoder.reorder_encoder_out(enc, torch.tensor([row]))
        prev = torch.cat([torch.tensor([d.eos()]), tokens[:-1]]).unsqueeze(0)
        net_output = model.decoder(prev, encoder_out=enc)
        att = model.get_normalized_probs(net_output, log_probs=True)[0].gather(1, tokens.unsqueeze(1)).squeeze(1)
        length = enc["encoder_out"][0].size(0) - int(enc["encoder_padding_mask"][0].sum()) \
            if len(enc["encoder_padding_mask"]) else enc["encoder_out"][0].size(0)
        ctc = F.log_softmax(model.encoder.ctc_proj(enc["encoder_out"][0][:length]).float(), dim=-1)
    labels = tokens[2:-1]
    nll = F.ctc_loss(ctc, labels.unsqueeze(0), torch.tensor([length]), torch.tensor([labels.numel()]),
                     blank=d.bos(), reduction="sum")
    return att, -nll.item()


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_beam_search_scores_are_the_joint_score_of_the_hypotheses(task_and_model, weight):
    task, model = task_and_model
    ds = task.datasets["train"]
    asr = [i for i in range(len(ds)) if ds.tasks[i] == "asr"]
    with torch.no_grad():  # a CTC head that mostly emits blank, as a trained one does: hypotheses end early
        model.encoder.ctc_proj.bias[task.tgt_dict.bos()] += 4.0
    task.args.ctc_decode_weight = weight
    generator = task.build_generator([model], Namespace(beam=3, max_len_a=0, max_len_b=12, min_len=1))
    assert isinstance(generator.model, JointCtcAttentionEnsemble)
    # one batch of utterances of different lengths: hypotheses end at different steps and beam search drops
    # finished sentences from the batch, which the CTC states must follow
    sample = batch_of(ds, asr)
    lengths = sorted(sample["net_input"]["src_lengths"].tolist())
    assert len(set(lengths)) == 3
    hypos = task.inference_step(generator, [model], sample)
    ends = [len(h["tokens"]) for nbest in hypos for h in nbest]
    assert len(hypos) == 3 and len(set(ends)) > 1 and max(ends) < 2 + 12 + 1  # not all stopped by the length limit
    for row, nbest in enumerate(hypos):
        assert len(nbest) == 3
        for hypo in nbest:
            tokens = hypo["tokens"].tolist()
            assert not set(tokens[2:]) & task.guiding_token_ids  # guiding tokens only in the forced prefix
            att, ctc = hypothesis_scores(task, model, sample, row, hypo)
            pos = hypo["positional_scores"]
            assert pos[:2] == pytest.approx(att[:2], abs=1e-3)  # the forced guiding prefix: the decoder's
            expected = (1 - weight) * att[2:].sum().item() + weight * ctc
            assert pos[2:].sum().item() == pytest.approx(expected, abs=2e-3)


def test_translation_rows_keep_the_decoders_scores(task_and_model):
    task, model = task_and_model
    ds = task.datasets["train"]
    st = [i for i in range(len(ds)) if ds.tasks[i] == "st"]
    sample = batch_of(ds, st)
    gen_args = Namespace(beam=2, max_len_a=0, max_len_b=10, min_len=1)
    plain = task.inference_step(task.build_generator([model], gen_args), [model], sample)
    task.args.ctc_decode_weight = 0.5
    joint = task.inference_step(task.build_generator([model], gen_args), [model], sample)
    for a, b in zip(plain, joint):
        assert [h["tokens"].tolist() for h in a] == [h["tokens"].tolist() for h in b]
        assert [h["score"].item() for h in a] == pytest.approx([h["score"].item() for h in b], abs=1e-5)


def test_bad_settings_are_clear_errors(task_and_model):
    task, model = task_and_model
    gen_args = Namespace(beam=2, max_len_a=0, max_len_b=10, min_len=1)
    task.args.ctc_decode_weight = 0.5
    with pytest.raises(ValueError, match="needs a model with a CTC head"):
        task.build_generator([build(task, ctc_weight=0.0)], gen_args)
    with pytest.raises(ValueError, match="decodes with one model; got an ensemble of 2"):
        task.build_generator([model, model], gen_args)
    task.args.ctc_prebeam = 0
    with pytest.raises(ValueError, match="--ctc-prebeam must be at least 1, got 0"):
        task.build_generator([model], gen_args)
    task.args.ctc_prebeam = 30
    task.args.ctc_decode_weight = 1.5
    with pytest.raises(ValueError, match=r"--ctc-decode-weight must be in \(0, 1\], got 1.5"):
        task.build_generator([model], gen_args)


def test_the_asr_mask_follows_the_rows_when_sentences_leave_the_beam(task_and_model):
    """A batch mixing ST and ASR rows: the ASR rows finish first and leave the batch, and the ST row behind them
    moves up into their places. The per-row ASR mask (read once per batch) must move with it: the ST rows keep the
    decoder's own scores, the ASR rows get the joint score."""
    task, model = task_and_model
    ds = task.datasets["train"]
    with torch.no_grad():
        model.encoder.ctc_proj.bias[task.tgt_dict.bos()] += 4.0
    sample = batch_of(ds, list(range(len(ds))))
    assert sample["tasks"] == ["st", "asr", "asr", "asr", "st"]  # sorted by length: the shortest, ST, is last
    gen_args = Namespace(beam=3, max_len_a=0, max_len_b=12, min_len=1)
    plain = task.inference_step(task.build_generator([model], gen_args), [model], sample)
    task.args.ctc_decode_weight = 0.5
    generator = task.build_generator([model], gen_args)
    rows, reorder = [], generator.model.reorder_encoder_out

    def record(encoder_outs, new_order):
        rows.append(new_order.numel())
        return reorder(encoder_outs, new_order)

    generator.model.reorder_encoder_out = record
    joint = task.inference_step(generator, [model], sample)
    assert rows[0] == 5 * 3 and min(rows) < rows[0]  # sentences left the batch before the last step
    for row, (task_name, a, b) in enumerate(zip(sample["tasks"], plain, joint)):
        if task_name == "st":
            assert [h["tokens"].tolist() for h in a] == [h["tokens"].tolist() for h in b], f"row {row}"
            assert [h["score"].item() for h in a] == pytest.approx([h["score"].item() for h in b], abs=1e-5)
            continue
        for hypo in b:
            att, ctc = hypothesis_scores(task, model, sample, row, hypo)
            pos = hypo["positional_scores"]
            assert pos[2:].sum().item() == pytest.approx(0.5 * att[2:].sum().item() + 0.5 * ctc, abs=2e-3)


def test_memory_benchmark_runs_both_layouts_with_identical_scores(tmp_path):
    """benchmarks/ctc_memory.py at a toy size: both layouts give the same scores, per source holds less."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ctc_memory.py"
    out = tmp_path / "ctc"
    proc = subprocess.run([sys.executable, str(script), "--frames", "40", "--batch", "2", "--beam", "4", "--vocabs",
                           "3000", "--candidates", "5", "--steps", "3", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    r = report["results"]["3000"]
    assert r["identical_scores"] is True
    before, after = r["layouts"]["before"], r["layouts"]["after"]
    assert before["held_peak_mb"] == pytest.approx(40 * 2 * 4 * 3000 * 4 / 2**20, rel=0.05)  # T x N x V fp32
    assert after["held_peak_mb"] == pytest.approx(40 * 2 * 3000 * 4 / 2**20, rel=0.1)  # T x B x V fp32
    assert "| 3,000 | after |" in out.with_suffix(".md").read_text()
