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

Memory: the CTC log-probabilities are kept once per *source* utterance (T x B x V, the caller's tensor, not
copied), with a row -> source index that beam search reorders instead of the frames. Each step gathers only the
candidate columns (T x N x K) and the blank column (T x N) of each row's source. Keeping T x N x V per hypothesis
row (N = B * beam) and copying it on every reorder took about 10 GB at a 40k vocabulary for a batch of 8 x beam 5
of 12 s utterances; ``benchmarks/ctc_memory.py`` measures both layouts.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

NEG_INF = float("-inf")


class CtcPrefixScorer:
    """CTC prefix state of every row of a beam search, with the candidate extensions of the last step.

    ``log_probs``: T x B x V CTC log-probabilities (log-softmax of the CTC head) of the B source utterances,
    ``lengths``: B valid frames. The scorer starts with one row per source; :meth:`index_select` makes rows of
    hypotheses (each row keeps the index of its source utterance). ``log_probs`` is kept as it is, not modified.
    """

    def __init__(self, log_probs: Tensor, lengths: Tensor, blank: int):
        T, B, _ = log_probs.shape
        # T x B x V, per source utterance (no copy if already fp32 and contiguous, as ``ctc_log_probs`` returns it)
        self.log_probs = log_probs.float().contiguous()
        device = self.log_probs.device
        # T x B: frames past each source's length; there blank has log-prob 0 and every label -inf
        self.padded = torch.arange(T, device=device).unsqueeze(1) >= lengths.to(device).unsqueeze(0)
        self.blank_lp = self.log_probs[:, :, blank].masked_fill(self.padded, 0.0)  # T x B
        self.blank = blank
        self.src = torch.arange(B, device=device)  # row -> source utterance
        # the empty prefix: nothing emitted, only blanks so far
        self.r = torch.full((T, 2, B), NEG_INF, device=device)
        self.r[:, 1] = torch.cumsum(self.blank_lp, dim=0)
        self.psi = self.blank_lp.new_zeros(B)
        self.last = torch.full((B,), -1, dtype=torch.long, device=device)  # -1: empty prefix
        # candidates scored at the last step and their states (None before the first step)
        self.cand: Optional[Tensor] = None
        self.cand_r: Optional[Tensor] = None
        self.cand_psi: Optional[Tensor] = None

    @property
    def num_rows(self) -> int:
        return self.src.size(0)

    def index_select(self, order: Tensor) -> None:
        """Keep rows ``order`` (beam search reordering, dropping finished sentences, expanding to the beam).

        Only the per-row states move (T x 2 x N and smaller); the log-probabilities stay per source.
        """
        order = order.to(self.src.device)
        self.src = self.src.index_select(0, order)
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
        leaves the row's prefix as it was. Rows are selected with ``torch.where``, not by asking whether any row
        matched: that would be a device -> host sync per decoding step.
        """
        if self.cand is None:
            return
        match = self.cand.eq(tokens.to(self.cand.device).unsqueeze(1))  # N x K
        hit = match.any(dim=1)
        k = match.float().argmax(dim=1)  # the matching column (any, where there is none)
        rows = torch.arange(self.num_rows, device=self.src.device)
        new_r = self.cand_r[:, :, rows, k]  # T x 2 x N
        self.r = torch.where(hit.view(1, 1, -1), new_r, self.r)
        self.psi = torch.where(hit, self.cand_psi[rows, k], self.psi)
        self.last = torch.where(hit, tokens.to(self.last.device), self.last)
        self.cand = self.cand_r = self.cand_psi = None

    def _columns(self, cand: Tensor) -> Tuple[Tensor, Tensor]:
        """T x N x K log-probs of each row's candidates and T x N of its blank, from the row's source."""
        T, B, V = self.log_probs.shape
        flat = (self.src.unsqueeze(1) * V + cand).view(-1)  # N*K indices into the B*V columns of a frame
        xc = self.log_probs.view(T, B * V).index_select(1, flat).view(T, *cand.shape)
        # a padded frame emits nothing but blank (which is never a candidate in decoding, but keep it exact)
        xc = xc.masked_fill(self.padded.index_select(1, self.src).unsqueeze(-1) & cand.ne(self.blank), NEG_INF)
        return xc, self.blank_lp.index_select(1, self.src)

    def score(self, cand: Tensor) -> Tensor:
        """``log psi(h c)`` for candidates ``cand`` (N x K) of every row; kept for :meth:`advance`."""
        r = self.r
        T = r.size(0)
        xc, xb = self._columns(cand)
        # phi: paths through h that may be followed by c; a repeated label needs a blank in between
        phi = torch.logaddexp(r[:, 0], r[:, 1]).unsqueeze(-1).expand(-1, -1, cand.size(1))
        phi = torch.where(cand.eq(self.last.unsqueeze(1)).unsqueeze(0), r[:, 1].unsqueeze(-1), phi)
        new_r = torch.full((T, 2) + tuple(cand.shape), NEG_INF, device=r.device)
        # only the empty prefix can emit its first label at frame 0
        new_r[0, 0] = torch.where(self.last.eq(-1).unsqueeze(1), xc[0], torch.full_like(xc[0], NEG_INF))
        xb = xb.unsqueeze(-1)  # T x N x 1
        for t in range(1, T):
            new_r[t, 0] = torch.logaddexp(new_r[t - 1, 0], phi[t - 1]) + xc[t]
            new_r[t, 1] = torch.logaddexp(new_r[t - 1, 0], new_r[t - 1, 1]) + xb[t]
        psi = torch.logsumexp(torch.cat([new_r[0, 0].unsqueeze(0), phi[:-1] + xc[1:]], dim=0), dim=0)
        self.cand, self.cand_r, self.cand_psi = cand, new_r, psi
        return psi

    def final_score(self) -> Tensor:
        """``log P_ctc(h | x)`` of each row's prefix as a complete label sequence (the score of ``</s>``)."""
        return torch.logaddexp(self.r[-1, 0], self.r[-1, 1])
