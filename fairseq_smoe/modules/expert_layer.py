"""The S-MoE expert layer: N feed-forward experts of the dense FFN's shape, one chosen per sample by its route.

Expert ``e`` of a layer is ``fc2[e](activation(fc1[e](x)))``: the layer's ``fc1`` and ``fc2`` are
:class:`ExpertLinear` modules holding the ``e``-th weights of every expert. They are plugged in through fairseq's
own ``build_fc1`` / ``build_fc2`` hooks, so self-attention, cross-attention, layer norms, dropout and incremental
decoding stay fairseq's code, untouched.

Only the routes present in a batch are computed: a batch with one route calls that expert's weights directly
(no gather/scatter). In a mixed batch, ``fc1`` gathers the rows once, sorted by route and batch-major so that each
expert's rows are one contiguous block, and runs each used expert on its block; the activation acts on that packed
tensor; ``fc2`` runs the second maps and puts the rows back in place once. The sort order comes from the
:class:`~fairseq_smoe.routing.RouteBatch` computed once per batch for all layers.
Weights are stored stacked (``[N, out, in]``) so an expert no row used in a batch still receives a (zero)
gradient, which keeps DistributedDataParallel from waiting for a gradient that never comes.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayer

from ..routing import RouteContext

# fairseq layers work on time-major tensors: T x B x C.
BATCH_DIM = 1


class GroupedLinear(torch.autograd.Function):
    """``out[a:b] = x[a:b] @ weight[e].T + bias[e]`` for each ``(e, a, b)`` in ``spans`` (rows grouped by expert).

    Each block is written straight into one output (no ``torch.cat``), and the backward writes each used expert's
    gradient straight into one ``[E, out, in]`` gradient (autograd of ``weight[e]`` per block would build a
    zero-filled ``[E, out, in]`` tensor per block and add them up). Rows outside every span get zeros.
    """

    @staticmethod
    def run(x, w, b, spans):
        covered = sum(hi - lo for _, lo, hi in spans)
        out = (x.new_empty if covered == x.size(0) else x.new_zeros)(x.size(0), w.size(1))
        for e, lo, hi in spans:
            if hi > lo:
                torch.addmm(b[e], x[lo:hi], w[e].t(), out=out[lo:hi])
        return out

    @staticmethod
    def forward(ctx, x, weight, bias, spans):
        w, b = weight.to(x.dtype), bias.to(x.dtype)  # like autocast: compute in the activations' dtype
        out = GroupedLinear.run(x, w, b, spans)
        ctx.save_for_backward(x, w)
        ctx.spans, ctx.weight_dtype, ctx.num_experts = spans, weight.dtype, weight.size(0)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        spans = [s for s in ctx.spans if s[2] > s[1]]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (x.new_empty if sum(hi - lo for _, lo, hi in spans) == x.size(0) else x.new_zeros)(x.shape)
            for e, lo, hi in spans:
                torch.mm(grad[lo:hi], w[e], out=grad_x[lo:hi])
        all_used = len({e for e, _, _ in spans}) == ctx.num_experts and len(spans) == ctx.num_experts
        if ctx.needs_input_grad[1]:
            grad_w = (w.new_empty if all_used else w.new_zeros)(w.shape)
            for e, lo, hi in spans:
                torch.mm(grad[lo:hi].t(), x[lo:hi], out=grad_w[e])
            grad_w = grad_w.to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = (grad.new_empty if all_used else grad.new_zeros)(w.size(0), w.size(1))
            for e, lo, hi in spans:
                torch.sum(grad[lo:hi], dim=0, out=grad_b[e])
            grad_b = grad_b.to(ctx.weight_dtype)
        return grad_x, grad_w, grad_b, None


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast computes linear maps in on ``x``'s device, or None where autocast is off there.

    Read from the input's device type (``cpu``, ``cuda``, ...), so the same code follows ``--amp`` on a GPU and
    ``torch.autocast('cpu', ...)`` on the CPU.
    """
    device_type = x.device.type
    if not x.is_floating_point() or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, spans) -> torch.Tensor:
    """:class:`GroupedLinear` on ``x`` of shape ``[rows, in]``; ``spans`` are ``(expert, start_row, end_row)``.

    ``torch.addmm(..., out=...)`` is not an autocast op (autocast casts only functional calls), so under autocast
    the input is cast here, as autocast casts ``F.linear``'s: the weights then follow the input's dtype inside
    :class:`GroupedLinear`, and their gradients go back to the master weights' dtype (fp32) in its backward. The
    cast of ``x`` is an ordinary autograd op, so ``x``'s gradient comes back in ``x``'s own dtype.
    """
    dtype = autocast_dtype(x)
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return GroupedLinear.apply(x, weight, bias, list(spans))
    return GroupedLinear.run(x, weight.to(x.dtype), bias.to(x.dtype), spans)  # inference: no autograd record


class ExpertLinear(nn.Module):
    """``num_experts`` parallel ``nn.Linear(in_features, out_features)`` maps, routed per batch row.

    One of the two maps of an expert FFN: ``fc1`` maps T x B x C to a mixed batch's rows packed by route, for the
    ``fc2`` of the same FFN to map and put back in place as T x B x out.
    """

    ROLES = ("fc1", "fc2")

    def __init__(self, in_features: int, out_features: int, num_experts: int, context: Optional[RouteContext],
                 role: str):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if role not in self.ROLES:
            raise ValueError(f"role must be one of {self.ROLES}, got {role!r}")
        self.role = role
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.context = context
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features))
        self.reset_parameters()

    def reset_parameters(self):
        """Each expert starts like a fresh ``nn.Linear`` (independent draws)."""
        bound = 1.0 / math.sqrt(self.in_features)
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))
            nn.init.uniform_(self.bias[e], -bound, bound)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}"

    def expert_forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return F.linear(x, self.weight[expert], self.bias[expert])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routes = self.context.get()
        if routes.single is not None:
            return self.expert_forward(x, routes.single)
        if self.role == "fc1":  # T x B x C -> packed (B sorted by route) x T x out
            return self._per_span(x.transpose(0, BATCH_DIM).index_select(0, routes.perm), routes)
        # fc2: packed -> T x B x out (contiguous, like a dense layer's), rows back in place
        return self._per_span(x, routes).transpose(0, BATCH_DIM).index_select(BATCH_DIM, routes.inverse)

    def _per_span(self, packed: torch.Tensor, routes) -> torch.Tensor:
        """Experts on a B-major tensor whose batch rows are sorted by route (``routes.spans``)."""
        steps = packed.size(1)  # rows of the 2-D view per batch row
        flat = packed.reshape(-1, packed.size(-1))
        out = grouped_linear(flat, self.weight, self.bias, [(r, a * steps, b * steps) for r, a, b in routes.spans])
        return out.view(packed.size(0), steps, self.out_features)


def _expert_fc(layer, input_dim, output_dim, q_noise, role):
    if q_noise > 0:
        raise ValueError("quant-noise (--quant-noise-pq) is not supported on S-MoE expert layers")
    return ExpertLinear(input_dim, output_dim, layer.smoe_num_experts, layer.smoe_context, role)


class SMoETransformerEncoderLayer(TransformerEncoderLayer):
    """fairseq's encoder layer with its FFN replaced by ``num_experts`` routed experts."""

    def __init__(self, args, num_experts: int, context: RouteContext):
        # read by build_fc1/build_fc2, which the parent constructor calls
        self.smoe_num_experts = num_experts
        self.smoe_context = context
        super().__init__(args)

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        return _expert_fc(self, input_dim, output_dim, q_noise, "fc1")

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return _expert_fc(self, input_dim, output_dim, q_noise, "fc2")


class SMoETransformerDecoderLayer(TransformerDecoderLayerBase):
    """fairseq's decoder layer with its FFN replaced by ``num_experts`` routed experts."""

    def __init__(self, cfg, no_encoder_attn: bool, num_experts: int, context: RouteContext):
        self.smoe_num_experts = num_experts
        self.smoe_context = context
        super().__init__(cfg, no_encoder_attn)

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        return _expert_fc(self, input_dim, output_dim, q_noise, "fc1")

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return _expert_fc(self, input_dim, output_dim, q_noise, "fc2")
