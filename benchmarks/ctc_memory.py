"""Memory and time of joint CTC/attention decoding's CTC prefix scorer: per-row layout (before) against per-source.

    .venv/bin/python benchmarks/ctc_memory.py --out benchmarks/results/ctc_memory_cpu      # T 300, batch 8, beam 5
    .venv/bin/python benchmarks/ctc_memory.py --device cuda --out benchmarks/results/ctc_memory_cuda

``before`` is the scorer of commit 84f9067 (copied below as :class:`PerRowCtcPrefixScorer`): it kept the CTC
log-probabilities as T x (batch * beam) x V fp32, one copy per hypothesis row, and copied them on every beam reorder
(``index_select``). ``after`` is :class:`fairseq_smoe.decoding.ctc_prefix_score.CtcPrefixScorer`: T x batch x V once, a
row -> source index that reorders, and per step only the candidate (T x N x K) and blank (T x N) columns.

Both run the call pattern of :class:`~fairseq_smoe.decoding.joint_ctc.JointCtcAttentionEnsemble` inside fairseq's
beam search, on the same seeded inputs and choices: build from the CTC log-probs of ``batch`` utterances (lengths
``frames`` down to 3/4 of it), expand to ``batch * beam`` rows, then per step ``advance`` (the token the beam chose,
sometimes one that was no candidate, as ``</s>`` or a forced token), ``score`` of ``K`` candidates per row,
``final_score`` and a beam reorder within each sentence. The hash of every step's scores shows both give identical
results.

Each (layout, vocabulary) runs in a fresh process with one intra-op thread. Memory, on CPU: the scorer's own
tensor bytes (distinct storages it holds, peak over the run), and the process's peak RSS growth (``VmHWM`` reset
through ``/proc/self/clear_refs`` just before the CTC log-probs are made, minus ``VmRSS`` then: what joint decoding
adds, log-probs included); on CUDA: ``torch.cuda.max_memory_allocated`` growth over the same span. Time: per
decoding step (CPU: process CPU time, which other jobs on a shared machine do not inflate; CUDA: wall time between
synchronisations), median over steps, runs interleaved before/after ``--repeats`` times.
"""

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor

from fairseq_smoe.decoding.ctc_prefix_score import CtcPrefixScorer

NEG_INF = float("-inf")


class PerRowCtcPrefixScorer:
    """The scorer before this change (commit 84f9067, verbatim but for the name): T x N x V per hypothesis row."""

    def __init__(self, log_probs: Tensor, lengths: Tensor, blank: int):
        T, N, _ = log_probs.shape
        x = log_probs.float().clone()
        padded = torch.arange(T, device=x.device).unsqueeze(1) >= lengths.to(x.device).unsqueeze(0)  # T x N
        x.masked_fill_(padded.unsqueeze(-1), NEG_INF)
        x[:, :, blank].masked_fill_(padded, 0.0)
        self.x = x
        self.blank = blank
        self.r = torch.full((T, 2, N), NEG_INF, device=x.device)
        self.r[:, 1] = torch.cumsum(x[:, :, blank], dim=0)
        self.psi = x.new_zeros(N)
        self.last = torch.full((N,), -1, dtype=torch.long, device=x.device)
        self.cand: Optional[Tensor] = None
        self.cand_r: Optional[Tensor] = None
        self.cand_psi: Optional[Tensor] = None

    @property
    def num_rows(self) -> int:
        return self.x.size(1)

    def index_select(self, order: Tensor) -> None:
        order = order.to(self.x.device)
        self.x = self.x.index_select(1, order)
        self.r = self.r.index_select(2, order)
        self.psi = self.psi.index_select(0, order)
        self.last = self.last.index_select(0, order)
        if self.cand is not None:
            self.cand = self.cand.index_select(0, order)
            self.cand_r = self.cand_r.index_select(2, order)
            self.cand_psi = self.cand_psi.index_select(0, order)

    def advance(self, tokens: Tensor) -> None:
        if self.cand is None:
            return
        match = self.cand.eq(tokens.to(self.cand.device).unsqueeze(1))
        hit = match.any(dim=1)
        if hit.any():
            k = match.float().argmax(dim=1)
            rows = torch.arange(self.num_rows, device=self.x.device)
            new_r = self.cand_r[:, :, rows, k]
            self.r = torch.where(hit.view(1, 1, -1), new_r, self.r)
            self.psi = torch.where(hit, self.cand_psi[rows, k], self.psi)
            self.last = torch.where(hit, tokens.to(self.last.device), self.last)
        self.cand = self.cand_r = self.cand_psi = None

    def score(self, cand: Tensor) -> Tensor:
        x, r = self.x, self.r
        T = x.size(0)
        xc = x.gather(2, cand.unsqueeze(0).expand(T, -1, -1))
        xb = x[:, :, self.blank].unsqueeze(-1)
        phi = torch.logaddexp(r[:, 0], r[:, 1]).unsqueeze(-1).expand(-1, -1, cand.size(1))
        phi = torch.where(cand.eq(self.last.unsqueeze(1)).unsqueeze(0), r[:, 1].unsqueeze(-1), phi)
        new_r = torch.full((T, 2) + tuple(cand.shape), NEG_INF, device=x.device)
        new_r[0, 0] = torch.where(self.last.eq(-1).unsqueeze(1), xc[0], torch.full_like(xc[0], NEG_INF))
        for t in range(1, T):
            new_r[t, 0] = torch.logaddexp(new_r[t - 1, 0], phi[t - 1]) + xc[t]
            new_r[t, 1] = torch.logaddexp(new_r[t - 1, 0], new_r[t - 1, 1]) + xb[t]
        psi = torch.logsumexp(torch.cat([new_r[0, 0].unsqueeze(0), phi[:-1] + xc[1:]], dim=0), dim=0)
        self.cand, self.cand_r, self.cand_psi = cand, new_r, psi
        return psi

    def final_score(self) -> Tensor:
        return torch.logaddexp(self.r[-1, 0], self.r[-1, 1])


LAYOUTS = {"before": PerRowCtcPrefixScorer, "after": CtcPrefixScorer}
BLANK = 0


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def held_bytes(scorer) -> int:
    """Bytes of the distinct tensor storages the scorer holds right now."""
    return sum({v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
                for v in vars(scorer).values() if isinstance(v, Tensor)}.values())


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(a) -> Dict:
    """One layout, one vocabulary, in this (fresh) process."""
    torch.set_num_threads(1)
    device = a.device
    cuda = device.startswith("cuda")
    clock = time.perf_counter if cuda else time.process_time
    T, B, beam, V, K = a.frames, a.batch, a.beam, a.vocab, a.candidates
    N = B * beam
    g = torch.Generator().manual_seed(0)
    lengths = torch.linspace(T, 0.75 * T, B).round().long()
    # the choices beam search makes, drawn up front (the same for both layouts)
    cands = [torch.multinomial(torch.ones(N, V - 4), K, generator=g) + 4 for _ in range(a.steps)]
    picks = [torch.randint(0, K + 1, (N,), generator=g) for _ in range(a.steps)]  # K: a non-candidate (</s>)
    orders = [(torch.arange(B).repeat_interleave(beam) * beam + torch.randint(0, beam, (N,), generator=g))
              for _ in range(a.steps)]
    cands, picks, orders = ([t.to(device) for t in ts] for ts in (cands, picks, orders))
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    rss_before = _status_mb("VmRSS")
    t0 = clock()
    # the CTC head's log-probs of the batch, as ctc_log_probs returns them (fp32, T x B x V)
    log_probs = torch.randn(T, B, V, generator=g).to(device).log_softmax(-1)
    scorer = LAYOUTS[a.layout](log_probs, lengths.to(device), BLANK)
    del log_probs  # the ensemble keeps no other reference
    scorer.index_select(torch.arange(B, device=device).repeat_interleave(beam))  # expand to the beam
    _sync(device)
    init_s = clock() - t0
    held = held_bytes(scorer)
    digest = hashlib.sha256()
    step_s = []
    eos = torch.full((N, 1), 2, dtype=torch.long, device=device)
    rows = torch.arange(N, device=device)
    for step in range(a.steps):
        _sync(device)
        t0 = clock()
        if step:
            prev = torch.cat([cands[step - 1], eos], dim=1)
            scorer.advance(prev[rows, picks[step - 1]])
        psi = scorer.score(cands[step])
        final = scorer.final_score()
        held = max(held, held_bytes(scorer))
        scorer.index_select(orders[step])
        _sync(device)
        step_s.append(clock() - t0)
        digest.update(psi.cpu().numpy().tobytes())
        digest.update(final.cpu().numpy().tobytes())
    held = max(held, held_bytes(scorer))
    out = {"layout": a.layout, "vocab": V, "held_peak_mb": held / 2**20, "init_s": init_s,
           "step_ms": [1000 * s for s in step_s], "scores_sha256": digest.hexdigest(),
           "rss_growth_mb": _status_mb("VmHWM") - rss_before}
    if cuda:
        out["cuda_peak_growth_mb"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2**20
    return out


def run_worker(a, layout: str, vocab: int) -> Dict:
    cmd = [sys.executable, __file__, "--worker", "--layout", layout, "--vocab", str(vocab), "--device", a.device]
    for k in ("frames", "batch", "beam", "candidates", "steps"):
        cmd += [f"--{k}", str(getattr(a, k))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {layout} V={vocab} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def quartiles(xs: List[float]):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=300, help="encoder frames T (12 s after 4x subsampling)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--vocabs", default="40000,8000,500", help="comma-separated vocabulary sizes")
    p.add_argument("--candidates", type=int, default=30, help="CTC-scored tokens per row (--ctc-prebeam)")
    p.add_argument("--steps", type=int, default=8, help="decoding steps per run")
    p.add_argument("--repeats", type=int, default=2, help="runs per layout and vocabulary, interleaved")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", choices=list(LAYOUTS), help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return
    cuda = a.device.startswith("cuda")
    machine = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
               "load_before": uptime()}
    vocabs = [int(v) for v in a.vocabs.split(",")]
    results = {}
    for V in vocabs:
        runs = {layout: [] for layout in LAYOUTS}
        for rep in range(a.repeats):
            for layout in (LAYOUTS if rep % 2 == 0 else list(LAYOUTS)[::-1]):
                runs[layout].append(run_worker(a, layout, V))
                print(f"V={V} {layout} run {rep + 1}/{a.repeats} done", file=sys.stderr)
        summary = {}
        for layout, rs in runs.items():
            steps = [ms for r in rs for ms in r["step_ms"][1:]]  # the first step of a run has no advance
            q1, med, q3 = quartiles(steps)
            mem_key = "cuda_peak_growth_mb" if cuda else "rss_growth_mb"
            summary[layout] = {
                "held_peak_mb": rs[0]["held_peak_mb"], "peak_growth_mb": statistics.median(r[mem_key] for r in rs),
                "peak_growth_of": mem_key, "step_ms_median": med, "step_ms_iqr": [q1, q3],
                "init_s_median": statistics.median(r["init_s"] for r in rs),
                "scores_sha256": sorted({r["scores_sha256"] for r in rs}),
            }
        b, f = summary["before"], summary["after"]
        results[V] = {
            "layouts": summary, "identical_scores": b["scores_sha256"] == f["scores_sha256"]
            and len(b["scores_sha256"]) == 1,
            "held_ratio": b["held_peak_mb"] / f["held_peak_mb"],
            "peak_growth_ratio": b["peak_growth_mb"] / max(f["peak_growth_mb"], 1e-9),
            "step_time_ratio_after_over_before": f["step_ms_median"] / b["step_ms_median"],
        }
    machine["load_after"] = uptime()
    # the README's decode command: --max-tokens 50000 fbank frames = 41 utterances of 12 s (1200 frames, 300 after
    # the 4x subsampling), beam 5, a 40k vocabulary: what the log-probs alone take in each layout
    T, beam = 300, 5
    readme_batch = 50000 // (4 * T)
    projection = {"batch": readme_batch, "beam": beam, "vocab": 40000, "frames": T,
                  "before_gb": T * readme_batch * beam * 40000 * 4 / 1e9,
                  "before_during_reorder_gb": 2 * T * readme_batch * beam * 40000 * 4 / 1e9,
                  "after_gb": T * readme_batch * 40000 * 4 / 1e9}
    report = {"config": {k: getattr(a, k) for k in ("frames", "batch", "beam", "candidates", "steps", "repeats",
                                                      "device")},
              "machine": machine, "results": {str(k): v for k, v in results.items()},
              "projection_readme_command": projection}
    md = render(report)
    print(md)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(md + "\n")


def render(report) -> str:
    c, m = report["config"], report["machine"]
    mem_label = "CUDA max_memory_allocated growth" if c["device"].startswith("cuda") else "peak RSS growth"
    lines = [
        f"# Joint CTC decoding: CTC prefix scorer memory and time, per-row (before) vs per-source (after)",
        "",
        f"T = {c['frames']} frames, batch {c['batch']}, beam {c['beam']} ({c['batch'] * c['beam']} hypothesis rows), "
        f"{c['candidates']} CTC-scored candidates per row, {c['steps']} decoding steps per run, {c['repeats']} runs "
        f"per layout (interleaved), device {m['device']}, torch {m['torch']}, one thread.",
        f"Load before: `{m['load_before']}`; after: `{m['load_after']}`.",
        "",
        f"| V | layout | scorer tensors (peak) | {mem_label} | ms per step (median, IQR) | identical scores |",
        "|---|---|---|---|---|---|",
    ]
    for V, r in report["results"].items():
        for layout in ("before", "after"):
            s = r["layouts"][layout]
            lines.append(f"| {int(V):,} | {layout} | {s['held_peak_mb']:.1f} MiB | {s['peak_growth_mb']:.1f} MiB | "
                         f"{s['step_ms_median']:.1f} ({s['step_ms_iqr'][0]:.1f}-{s['step_ms_iqr'][1]:.1f}) | "
                         f"{'yes' if r['identical_scores'] else 'NO'} |")
    lines.append("")
    for V, r in report["results"].items():
        lines.append(f"* V = {int(V):,}: scorer tensors x{r['held_ratio']:.1f} smaller, {mem_label} "
                     f"x{r['peak_growth_ratio']:.1f} smaller; time per step after/before = "
                     f"{r['step_time_ratio_after_over_before']:.2f}.")
    p = report["projection_readme_command"]
    lines.append(f"* The README's decode command (`--max-tokens 50000`: {p['batch']} utterances of 12 s, beam "
                 f"{p['beam']}, V = {p['vocab']:,}), log-probs alone: before {p['before_gb']:.1f} GB per copy, "
                 f"{p['before_during_reorder_gb']:.1f} GB while a reorder copies them; after {p['after_gb']:.2f} GB.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
