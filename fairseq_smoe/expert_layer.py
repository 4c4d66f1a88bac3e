"""The S-MoE expert layer: N feed-forward experts of the dense FFN's shape, one chosen per sample by its route.

Expert ``e`` of a layer is ``fc2[e](activation(fc1[e](x)))``: the layer's ``fc1`` and ``fc2`` are
:class:`ExpertLinear` modules holding the ``e``-th weights of every expert. They are plugged in through fairseq's
own ``build_fc1`` / ``build_fc2`` hooks, so self-attention, cross-attention, layer norms, dropout and incremental
decoding stay fairseq's code, untouched.

Only the routes present in a batch are computed: a batch with one route calls that expert's weights directly
(no gather/scatter); a mixed batch runs each used expert on its own rows and writes the result back in place.
Weights are stored stacked (``[N, out, in]``) so an expert no row used in a batch still receives a (zero)
gradient, which keeps DistributedDataParallel from waiting for a gradient that never comes.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayer

from .routing import RouteContext

# fairseq layers work on time-major tensors: T x B x C.
BATCH_DIM = 1


class ExpertLinear(nn.Module):
    """``num_experts`` parallel ``nn.Linear(in_features, out_features)`` maps, routed per batch row."""

    def __init__(self, in_features: int, out_features: int, num_experts: int, context: RouteContext):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
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
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for expert, rows in routes.groups:
            out.index_copy_(BATCH_DIM, rows, self.expert_forward(x.index_select(BATCH_DIM, rows), expert))
        return out


def _expert_fc(layer, input_dim, output_dim, q_noise):
    if q_noise > 0:
        raise ValueError("quant-noise (--quant-noise-pq) is not supported on S-MoE expert layers")
    return ExpertLinear(input_dim, output_dim, layer.smoe_num_experts, layer.smoe_context)


class SMoETransformerEncoderLayer(TransformerEncoderLayer):
    """fairseq's encoder layer with its FFN replaced by ``num_experts`` routed experts."""

    def __init__(self, args, num_experts: int, context: RouteContext):
        # read by build_fc1/build_fc2, which the parent constructor calls
        self.smoe_num_experts = num_experts
        self.smoe_context = context
        super().__init__(args)

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        return _expert_fc(self, input_dim, output_dim, q_noise)

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return _expert_fc(self, input_dim, output_dim, q_noise)


class SMoETransformerDecoderLayer(TransformerDecoderLayerBase):
    """fairseq's decoder layer with its FFN replaced by ``num_experts`` routed experts."""

    def __init__(self, cfg, no_encoder_attn: bool, num_experts: int, context: RouteContext):
        self.smoe_num_experts = num_experts
        self.smoe_context = context
        super().__init__(cfg, no_encoder_attn)

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        return _expert_fc(self, input_dim, output_dim, q_noise)

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return _expert_fc(self, input_dim, output_dim, q_noise)
