"""The learned-gate baseline: top-1 switch routing per token with a load-balancing loss (Switch Transformer).

This is what S-MoE is compared against, both for quality (learned vs supervised routing) and for speed. Each FFN
has ``num_experts`` experts of the dense FFN's shape, stored stacked like the S-MoE experts. A linear router
(``fc1.gate``, computed in fp32) scores every non-padding token; the token goes to its argmax expert and the
expert's output is scaled by the router probability, so the router learns through it. Each expert takes at most
``capacity = ceil(capacity_factor * tokens / num_experts)`` tokens, in sequence order; the rest (and padding) get
a zero FFN output, so only the residual carries them to the next layer. The auxiliary loss is Switch's
``num_experts * sum_e f_e * P_e`` (``f_e``: fraction of tokens whose argmax is ``e``, ``P_e``: mean router
probability of ``e``), reported per layer to the criterion (``label_smoothed_cross_entropy_moe``).

Like the S-MoE layers, the experts plug into fairseq's own encoder/decoder layers through ``build_fc1`` /
``build_fc2``: ``fc1`` routes, gathers the kept tokens grouped by expert and runs each expert's first linear map
on its group; the activation and dropout act on that packed ``[kept tokens, ffn]`` tensor; ``fc2`` runs the
second maps and scatters the gated results back into place.
"""

import math
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayer

from .expert_layer import ExpertLinear, grouped_linear


class AuxLossCollector:
    """Gathers the per-layer router statistics of one model forward (only while a criterion asks for them)."""

    def __init__(self):
        self.records: Optional[List[Dict[str, Tensor]]] = None

    @contextmanager
    def collect(self):
        previous, self.records = self.records, []
        try:
            yield self.records
        finally:
            self.records = previous

    @property
    def active(self) -> bool:
        return self.records is not None

    def add(self, record: Dict[str, Tensor]) -> None:
        if self.records is not None:
            self.records.append(record)


class _Dispatch:
    """What ``fc1`` decided for the tokens in flight, for ``fc2`` of the same layer to put the results back."""

    __slots__ = ("shape", "order", "counts", "gate")

    def __init__(self, shape, order: Tensor, counts: List[int], gate: Tensor):
        self.shape = shape  # input shape (T x B x C)
        self.order = order  # flat indices of the kept tokens, grouped by expert
        self.counts = counts  # kept tokens per expert
        self.gate = gate  # router probability (fp32) of each kept token, in ``order``


class SwitchState:
    """Shared by ``fc1`` and ``fc2`` of one layer: the padding mask of the current input and the dispatch."""

    def __init__(self, num_experts: int, capacity_factor: float, eval_capacity_factor: float,
                 collector: Optional[AuxLossCollector] = None):
        if num_experts < 2:
            raise ValueError(f"a switch layer needs at least 2 experts, got {num_experts}")
        if capacity_factor <= 0 or eval_capacity_factor <= 0:
            raise ValueError(
                f"capacity factors must be > 0, got {capacity_factor} (train) / {eval_capacity_factor} (eval)"
            )
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.collector = collector
        self.padding_mask: Optional[Tensor] = None  # B x T, True at padding
        self.dispatch: Optional[_Dispatch] = None

    def capacity(self, num_tokens: int, training: bool) -> int:
        factor = self.capacity_factor if training else self.eval_capacity_factor
        return max(1, math.ceil(factor * num_tokens / self.num_experts))


class SwitchLinear(ExpertLinear):
    """One of the two linear maps of ``num_experts`` switch-routed FFN experts (``role`` ``fc1`` or ``fc2``)."""

    def __init__(self, in_features: int, out_features: int, state: SwitchState, role: str, model_dim: int):
        super().__init__(in_features, out_features, state.num_experts, context=None, role=role)
        self.state = state
        if role == "fc1":
            self.gate = nn.Linear(model_dim, state.num_experts, bias=False)

    def extra_repr(self):
        return super().extra_repr() + f", role={self.role}"

    def forward(self, x: Tensor) -> Tensor:
        return self._route_and_expand(x) if self.role == "fc1" else self._contract_and_combine(x)

    def _route_and_expand(self, x: Tensor) -> Tensor:
        state = self.state
        num_experts = state.num_experts
        flat = x.reshape(-1, x.size(-1))
        n = flat.size(0)
        # the router in fp32 (a bf16 softmax over near-equal logits picks experts by rounding); autocast would cast
        # F.linear's fp32 inputs back to bf16, hence the opt-out (on the input's device type)
        with torch.autocast(flat.device.type, enabled=False):
            probs = torch.softmax(F.linear(flat.float(), self.gate.weight.float()), dim=-1)  # N x E, fp32
        gate, expert = probs.max(dim=-1)
        mask = state.padding_mask
        one_hot = F.one_hot(expert, num_experts).to(probs.dtype)
        if mask is None:
            real, probs_real = None, probs
            n_real = denom = float(max(n, 1))
            capacity = state.capacity(n, self.training)
        else:  # counts stay on the device: no host sync here (the only one is the split sizes below)
            real = ~mask.transpose(0, 1).reshape(-1)  # T x B order, like ``flat``
            one_hot = one_hot * real.unsqueeze(1).to(probs.dtype)
            probs_real = probs * real.unsqueeze(1).to(probs.dtype)
            n_real = real.sum().to(probs.dtype)
            denom = n_real.clamp(min=1.0)
            factor = state.capacity_factor if self.training else state.eval_capacity_factor
            capacity = torch.ceil(factor * n_real / num_experts).clamp(min=1.0)
        # position of each token in its expert's queue, in sequence order (T-major, as Switch/fairseq do)
        position = (one_hot.cumsum(0) * one_hot).sum(1) - 1
        keep = position < capacity
        if real is not None:
            keep &= real
        if state.collector is not None and state.collector.active:
            fraction = one_hot.sum(0) / denom  # f_e
            mean_prob = probs_real.sum(0) / denom  # P_e
            state.collector.add({
                "aux_loss": num_experts * (fraction * mean_prob).sum(),
                "dropped": (1.0 - keep.sum() / denom).detach(),
            })
        # group the kept tokens by expert: stable sort on the expert id, dropped tokens (key E) last
        key = torch.where(keep, expert, torch.full_like(expert, num_experts))
        order = torch.argsort(key, stable=True)
        # counted with scatter_add_, not bincount: CUDA's bincount reads the ids' min and max on the host first,
        # so the split sizes' tolist() stays this layer's only device-to-host read
        counts = torch.zeros(num_experts + 1, dtype=torch.long, device=key.device).scatter_add_(
            0, key, torch.ones_like(key)).tolist()[:num_experts]
        order = order[: sum(counts)]
        state.dispatch = _Dispatch(x.shape, order, counts, gate.index_select(0, order))
        packed = flat.index_select(0, order)
        return self._per_expert(packed, counts)

    def _contract_and_combine(self, h: Tensor) -> Tensor:
        dispatch, self.state.dispatch = self.state.dispatch, None
        if dispatch is None:
            raise RuntimeError("switch fc2 ran without its fc1 having routed the tokens")
        y = self._per_expert(h, dispatch.counts)
        # the router's probabilities are fp32 by design; scaled in the experts' dtype, so that under autocast the
        # gated output stays in the autocast dtype (fp32 * bf16 would promote it back to fp32)
        y = y * dispatch.gate.to(y.dtype).unsqueeze(1)
        out = y.new_zeros(math.prod(dispatch.shape[:-1]), self.out_features)
        out.index_copy_(0, dispatch.order, y)
        return out.view(*dispatch.shape[:-1], self.out_features)

    def _per_expert(self, packed: Tensor, counts: List[int]) -> Tensor:
        spans, start = [], 0
        for e, c in enumerate(counts):
            spans.append((e, start, start + c))
            start += c
        return grouped_linear(packed, self.weight, self.bias, spans)


class SwitchTransformerEncoderLayer(TransformerEncoderLayer):
    """fairseq's encoder layer with its FFN replaced by ``num_experts`` top-1 switch-routed experts."""

    def __init__(self, args, state: SwitchState):
        self.switch_state = state  # read by build_fc1/build_fc2, which the parent constructor calls
        super().__init__(args)

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        _no_quant_noise(q_noise)
        return SwitchLinear(input_dim, output_dim, self.switch_state, "fc1", input_dim)

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        _no_quant_noise(q_noise)
        return SwitchLinear(input_dim, output_dim, self.switch_state, "fc2", output_dim)

    def forward(self, x, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None):
        self.switch_state.padding_mask = encoder_padding_mask
        try:
            return super().forward(x, encoder_padding_mask, attn_mask)
        finally:
            self.switch_state.padding_mask = None


class SwitchTransformerDecoderLayer(TransformerDecoderLayerBase):
    """fairseq's decoder layer with its FFN replaced by ``num_experts`` top-1 switch-routed experts."""

    def __init__(self, cfg, no_encoder_attn: bool, state: SwitchState):
        self.switch_state = state
        super().__init__(cfg, no_encoder_attn)

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        _no_quant_noise(q_noise)
        return SwitchLinear(input_dim, output_dim, self.switch_state, "fc1", input_dim)

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        _no_quant_noise(q_noise)
        return SwitchLinear(input_dim, output_dim, self.switch_state, "fc2", output_dim)

    def forward(self, x, *args, self_attn_padding_mask: Optional[Tensor] = None, **kwargs):
        self.switch_state.padding_mask = self_attn_padding_mask
        try:
            return super().forward(x, *args, self_attn_padding_mask=self_attn_padding_mask, **kwargs)
        finally:
            self.switch_state.padding_mask = None


def _no_quant_noise(q_noise):
    if q_noise > 0:
        raise ValueError("quant-noise (--quant-noise-pq) is not supported on switch expert layers")
