"""Joint CTC/attention beam search for ``fairseq-generate`` (``--ctc-decode-weight W``), ASR rows only.

fairseq's ``SequenceGenerator`` asks its ``EnsembleModel`` for next-token log-probabilities, and tells it how the
beam was reordered (``reorder_encoder_out``). This ensemble answers with the joint score of
:mod:`.ctc_prefix_score` instead, so fairseq's own beam search, length penalty, prefix forcing and output do the
rest. An attention decoder trained briefly on little speech recites likely training sentences; the CTC head of the
same encoder (trained by ``label_smoothed_cross_entropy_asr_ctc``) has no text prior and keeps the hypothesis tied
to the audio — ESPnet decodes its hybrid models this way.

Only ASR rows are rescored (CTC is trained on transcripts); the rows of other tasks keep the decoder's scores.
Candidates: the ``prebeam`` best tokens of the decoder per row, plus ``</s>``; guiding tokens after the forced prefix
are never candidates. Which rows are ASR rows comes with the batch: the collater's per-row mask (derived from the
decoder route ids by :class:`~fairseq_smoe.routing.RoutingTable`), on the host, copied to the device once per batch
and then following the rows through every beam reorder, so decoding never reads anything back from the device to
find them.
"""

import logging
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from fairseq import utils
from fairseq.sequence_generator import EnsembleModel

from .ctc_prefix_score import CtcPrefixScorer
from ..routing import PREFIX_LEN, RoutingTable, asr_rows_of

logger = logging.getLogger(__name__)


def ctc_log_probs(encoder, encoder_out) -> Tuple[Tensor, Tensor]:
    """The CTC head's log-probabilities (T x B x V) of an encoder output and each row's number of frames."""
    x = encoder_out["encoder_out"][0]  # T x B x C
    log_probs = utils.log_softmax(encoder.ctc_proj(x).float(), dim=-1)
    lengths = torch.full((x.size(1),), x.size(0), dtype=torch.long, device=x.device)
    if len(encoder_out.get("encoder_padding_mask", [])) > 0:
        lengths = lengths - encoder_out["encoder_padding_mask"][0].long().sum(dim=-1)
    return log_probs, lengths


class JointCtcAttentionEnsemble(EnsembleModel):
    def __init__(self, models, tgt_dict, ctc_weight: float, prebeam: int, guiding_token_ids,
                 routing_table: Optional[RoutingTable] = None):
        super().__init__(models)
        if not 0 < ctc_weight <= 1:
            raise ValueError(f"--ctc-decode-weight must be in (0, 1], got {ctc_weight}")
        if prebeam < 1:
            raise ValueError(f"--ctc-prebeam must be at least 1, got {prebeam}")
        if len(models) != 1:
            raise ValueError(f"--ctc-decode-weight decodes with one model; got an ensemble of {len(models)} "
                             f"(--path a:b): decode them one at a time or set --ctc-decode-weight 0")
        if getattr(getattr(models[0], "encoder", None), "ctc_proj", None) is None:
            raise ValueError("--ctc-decode-weight needs a model with a CTC head (trained with "
                             "--criterion label_smoothed_cross_entropy_asr_ctc); this one has none")
        self.ctc_weight = ctc_weight
        self.blank = tgt_dict.bos()  # as label_smoothed_cross_entropy_asr_ctc trains it
        self.eos = tgt_dict.eos()
        self.routing_table = routing_table or RoutingTable()
        # tokens CTC can emit: real output tokens (no specials, no guiding tokens)
        self.emittable = torch.ones(len(tgt_dict), dtype=torch.bool)  # moved to the scores' device at the first step
        self.emittable[: tgt_dict.nspecial] = False
        self.emittable[sorted(guiding_token_ids)] = False
        self.num_candidates = min(prebeam, int(self.emittable.sum()))
        self.scorer: Optional[CtcPrefixScorer] = None
        self.prefix_len = PREFIX_LEN  # the guiding prefix beam search forces (the task sets it per batch)
        # per hypothesis row: is it an ASR row? Set from the batch's route mask in forward_encoder, reordered with
        # the rows; ``any_asr``: whether the batch has one at all (known on the host)
        self.asr_rows: Optional[Tensor] = None
        self.any_asr = False

    def forward_encoder(self, net_input: Dict[str, Tensor]):
        encoder_outs = super().forward_encoder(net_input)
        log_probs, lengths = ctc_log_probs(self.single_model.encoder, encoder_outs[0])
        self.scorer = CtcPrefixScorer(log_probs, lengths, self.blank)
        asr = asr_rows_of(net_input, self.routing_table)  # host mask, one per row (a new batch)
        self.any_asr = bool(asr.any())
        self.asr_rows = torch.from_numpy(asr).to(log_probs.device, non_blocking=True)
        return encoder_outs

    def reorder_encoder_out(self, encoder_outs, new_order):
        if self.scorer is not None:
            self.scorer.index_select(new_order)
        if self.asr_rows is not None:  # rows follow their hypotheses (beam expansion, finished sentences leave)
            self.asr_rows = self.asr_rows.index_select(0, new_order.to(self.asr_rows.device))
        return super().reorder_encoder_out(encoder_outs, new_order)

    def forward_decoder(self, tokens, encoder_outs: List[Dict[str, List[Tensor]]],
                        incremental_states: List[Dict[str, Dict[str, Optional[Tensor]]]], temperature: float = 1.0):
        lprobs, attn = super().forward_decoder(tokens, encoder_outs, incremental_states, temperature)
        scorer = self.scorer
        scorer.advance(tokens[:, -1])
        if tokens.size(1) <= self.prefix_len or not self.any_asr:  # the guiding prefix is being forced / no ASR row
            return lprobs, attn
        asr = self.asr_rows
        att = lprobs.float()
        if self.emittable.device != att.device:
            self.emittable = self.emittable.to(att.device)
        w = self.ctc_weight
        cand = att.masked_fill(~self.emittable, float("-inf")).topk(self.num_candidates, dim=-1).indices  # N x k
        psi = scorer.score(cand)
        joint = torch.full_like(att, float("-inf"))
        joint.scatter_(1, cand, (1 - w) * att.gather(1, cand) + w * (psi - scorer.psi.unsqueeze(1)))
        joint[:, self.eos] = (1 - w) * att[:, self.eos] + w * (scorer.final_score() - scorer.psi)
        return torch.where(asr.unsqueeze(1), joint, att).to(lprobs.dtype), attn
