"""CTC prefix scores for label-synchronous beam search (Watanabe et al. 2017, "Hybrid CTC/attention", Alg. 2).

The attention decoder scores a hypothesis token by token; CTC scores whole label sequences. The CTC *prefix*
probability ``psi(h) = P(h... | x)`` (all label sequences that start with ``h``) can be extended one token at a
time: for a prefix ``h`` keep, per frame ``t``, the log-probabilities that the first ``t`` frames emitted ``h`` and
ended in a non-blank (``r_n``) or a blank (``r_b``); extending with ``c`` is one pass over the frames. The joint
score of a token is then ``(1 - w) log p_att(c | h) + w (log psi(h c) - log psi(h))``, and of ``</s>``
``w (log P_ctc(h | x) - log psi(h))``: a hypothesis that stops before the audio is spoken for, or that runs on past
it, is penalised by the model that has no text prior.

All rows (hypotheses of the beam) are scored at once for a set of candidate tokens per row; the frame loop is the
only Python loop. Padded frames emit blank with probability 1, so a row's scores stop changing after its last
frame and ``r`` at the final frame is the full-sequence probability.
"""

from typing import Optional

import torch
from torch import Tensor

NEG_INF = float("-inf")


class CtcPrefixScorer:
    """CTC prefix state of every row of a beam search, with the candidate extensions of the last step.

    ``log_probs``: T x N x V CTC log-probabilities (log-softmax of the CTC head), ``lengths``: N valid frames.
    """

    def __init__(self, log_probs: Tensor, lengths: Tensor, blank: int):
        T, N, _ = log_probs.shape
        x = log_probs.float().clone()
        padded = torch.arange(T, device=x.device).unsqueeze(1) >= lengths.to(x.device).unsqueeze(0)  # T x N
        x.masked_fill_(padded.unsqueeze(-1), NEG_INF)
        x[:, :, blank].masked_fill_(padded, 0.0)
        self.x = x
        self.blank = blank
        # the empty prefix: nothing emitted, only blanks so far
        self.r = torch.full((T, 2, N), NEG_INF, device=x.device)
        self.r[:, 1] = torch.cumsum(x[:, :, blank], dim=0)
        self.psi = x.new_zeros(N)
        self.last = torch.full((N,), -1, dtype=torch.long, device=x.device)  # -1: empty prefix
        # candidates scored at the last step and their states (None before the first step)
        self.cand: Optional[Tensor] = None
        self.cand_r: Optional[Tensor] = None
        self.cand_psi: Optional[Tensor] = None

    @property
    def num_rows(self) -> int:
        return self.x.size(1)

    def index_select(self, order: Tensor) -> None:
        """Keep rows ``order`` (beam search reordering, dropping finished sentences, expanding to the beam)."""
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
        """Extend each row's prefix by ``tokens`` (N), the token beam search appended to it.

        A token that was not a scored candidate (a forced guiding token, ``</s>``, anything CTC does not emit)
        leaves the row's prefix as it was.
        """
        if self.cand is None:
            return
        match = self.cand.eq(tokens.to(self.cand.device).unsqueeze(1))  # N x K
        hit = match.any(dim=1)
        if hit.any():
            k = match.float().argmax(dim=1)  # the matching column (any, where there is none)
            rows = torch.arange(self.num_rows, device=self.x.device)
            new_r = self.cand_r[:, :, rows, k]  # T x 2 x N
            self.r = torch.where(hit.view(1, 1, -1), new_r, self.r)
            self.psi = torch.where(hit, self.cand_psi[rows, k], self.psi)
            self.last = torch.where(hit, tokens.to(self.last.device), self.last)
        self.cand = self.cand_r = self.cand_psi = None

    def score(self, cand: Tensor) -> Tensor:
        """``log psi(h c)`` for candidates ``cand`` (N x K) of every row; kept for :meth:`advance`."""
        x, r = self.x, self.r
        T = x.size(0)
        xc = x.gather(2, cand.unsqueeze(0).expand(T, -1, -1))  # T x N x K
        xb = x[:, :, self.blank].unsqueeze(-1)  # T x N x 1
        # phi: paths through h that may be followed by c; a repeated label needs a blank in between
        phi = torch.logaddexp(r[:, 0], r[:, 1]).unsqueeze(-1).expand(-1, -1, cand.size(1))
        phi = torch.where(cand.eq(self.last.unsqueeze(1)).unsqueeze(0), r[:, 1].unsqueeze(-1), phi)
        new_r = torch.full((T, 2) + tuple(cand.shape), NEG_INF, device=x.device)
        # only the empty prefix can emit its first label at frame 0
        new_r[0, 0] = torch.where(self.last.eq(-1).unsqueeze(1), xc[0], torch.full_like(xc[0], NEG_INF))
        for t in range(1, T):
            new_r[t, 0] = torch.logaddexp(new_r[t - 1, 0], phi[t - 1]) + xc[t]
            new_r[t, 1] = torch.logaddexp(new_r[t - 1, 0], new_r[t - 1, 1]) + xb[t]
        psi = torch.logsumexp(torch.cat([new_r[0, 0].unsqueeze(0), phi[:-1] + xc[1:]], dim=0), dim=0)
        self.cand, self.cand_r, self.cand_psi = cand, new_r, psi
        return psi

    def final_score(self) -> Tensor:
        """``log P_ctc(h | x)`` of each row's prefix as a complete label sequence (the score of ``</s>``)."""
        return torch.logaddexp(self.r[-1, 0], self.r[-1, 1])
