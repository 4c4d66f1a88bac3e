"""Joint CTC/attention beam search for ``fairseq-generate`` (``--ctc-decode-weight W``), ASR rows only.

fairseq's ``SequenceGenerator`` asks its ``EnsembleModel`` for next-token log-probabilities, and tells it how the
beam was reordered (``reorder_encoder_out``). This ensemble answers with the joint score of
:mod:`.ctc_prefix_score` instead, so fairseq's own beam search, length penalty, prefix forcing and output do the
rest. An attention decoder trained briefly on little speech recites likely training sentences; the CTC head of the
same encoder (trained by ``label_smoothed_cross_entropy_asr_ctc``) has no text prior and keeps the hypothesis tied
to the audio — ESPnet decodes its hybrid models this way.

Only rows whose guiding prefix is ``<transcribe>`` are rescored (CTC is trained on transcripts); translation rows
keep the decoder's scores. Candidates: the ``prebeam`` best tokens of the decoder per row, plus ``</s>``; guiding
tokens after the forced prefix are never candidates. Which rows are ASR rows is read from the device once per batch
(at the first step after the forced prefix) and then follows the rows through every beam reorder, so a decoding
step itself asks the device nothing.
"""

import logging
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from fairseq import utils
from fairseq.sequence_generator import EnsembleModel

from .ctc_prefix_score import CtcPrefixScorer
from ..routing import TASK_TO_GUIDING_TOKEN, guiding_token

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
    def __init__(self, models, tgt_dict, ctc_weight: float, prebeam: int, guiding_token_ids):
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
        self.transcribe = tgt_dict.index(guiding_token(TASK_TO_GUIDING_TOKEN["asr"]))
        if self.transcribe == tgt_dict.unk():
            raise ValueError(f"{guiding_token(TASK_TO_GUIDING_TOKEN['asr'])} is not in the dictionary")
        # tokens CTC can emit: real output tokens (no specials, no guiding tokens)
        self.emittable = torch.ones(len(tgt_dict), dtype=torch.bool)  # moved to the scores' device at the first step
        self.emittable[: tgt_dict.nspecial] = False
        self.emittable[sorted(guiding_token_ids)] = False
        self.num_candidates = min(prebeam, int(self.emittable.sum()))
        self.scorer: Optional[CtcPrefixScorer] = None
        self.prefix_len = 2  # the guiding prefix beam search forces (the task sets it per batch)
        # per hypothesis row: is it an ASR row (guiding token <transcribe>)? Set at the batch's first free step,
        # reordered with the rows; ``any_asr``: whether the batch has one at all (asked of the device once)
        self.asr_rows: Optional[Tensor] = None
        self.any_asr = False

    def forward_encoder(self, net_input: Dict[str, Tensor]):
        encoder_outs = super().forward_encoder(net_input)
        self.scorer = CtcPrefixScorer(*ctc_log_probs(self.single_model.encoder, encoder_outs[0]), self.blank)
        self.asr_rows, self.any_asr = None, False  # a new batch
        return encoder_outs

    def reorder_encoder_out(self, encoder_outs, new_order):
        if self.scorer is not None:
            self.scorer.index_select(new_order)
        if self.asr_rows is not None:  # rows follow their hypotheses (finished sentences leave the batch)
            self.asr_rows = self.asr_rows.index_select(0, new_order.to(self.asr_rows.device))
        return super().reorder_encoder_out(encoder_outs, new_order)

    def forward_decoder(self, tokens, encoder_outs: List[Dict[str, List[Tensor]]],
                        incremental_states: List[Dict[str, Dict[str, Optional[Tensor]]]], temperature: float = 1.0):
        lprobs, attn = super().forward_decoder(tokens, encoder_outs, incremental_states, temperature)
        scorer = self.scorer
        scorer.advance(tokens[:, -1])
        if tokens.size(1) <= self.prefix_len:
            return lprobs, attn  # the guiding prefix is being forced
        if self.asr_rows is None:
            # the first step after the forced prefix: every row holds its guiding token now. Read it once per
            # batch (the only device -> host sync here), not at every step
            self.asr_rows = tokens[:, 1].eq(self.transcribe)
            self.any_asr = bool(self.asr_rows.any())
        if not self.any_asr:
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
