"""S2T Transformer with Supervised-MoE feed-forward layers (the paper's Base, DecFFNx2, DecS-MoE, EncDecS-MoE).

Everything but the FFNs is fairseq's ``s2t_transformer``: the convolutional subsampler, attention, embeddings and
the incremental decoder. The encoder FFNs are routed by input bandwidth, the decoder FFNs by the task guiding
token; both route-id vectors arrive in ``net_input`` from the ``speech_to_text_smoe`` collater, together with the
same ids on the host (``route_plan``, a :class:`~fairseq_smoe.routing.RoutePlan`), so that no route id is read
back from the device: a training step of an S-MoE or dense model makes no route-related device-to-host transfer
(``tests/test_host_transfers.py`` counts them). Decoder route ids travel inside ``encoder_out`` so that beam
search's ``reorder_encoder_out`` keeps them aligned with the hypotheses, and incremental decoding (which only sees
the last token) still knows each row's task: a one-route batch keeps a host-side flag through every reordering
(no copy per step); a mixed batch, whose rows beam search reorders on the device, copies its decoder ids to the
host once per decoding step.
"""

import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from fairseq import checkpoint_utils
from fairseq.distributed import fsdp_wrap
from fairseq.models import register_model, register_model_architecture
from fairseq.models.speech_to_text.s2t_transformer import (
    S2TTransformerEncoder,
    S2TTransformerModel,
    TransformerDecoderScriptable,
)
from fairseq.models.speech_to_text.s2t_transformer import base_architecture as s2t_base_architecture
from fairseq.models.transformer import TransformerConfig

from ..modules.expert_layer import SMoETransformerDecoderLayer, SMoETransformerEncoderLayer
from ..routing import (
    DEFAULT_DECODER_ROUTES,
    DEFAULT_ENCODER_ROUTES,
    RouteContext,
    RoutePlan,
    RoutingTable,
    checkpoint_routed_layer,
)

logger = logging.getLogger(__name__)

# encoder_out key of the decoder route ids (the collater's net_input names them alike)
DECODER_ROUTE_KEY = "decoder_route_ids"
# [CPU scalar tensor] when every row of the batch takes one decoder route, else []: any beam-search reordering keeps
# a one-route batch one-route, so incremental decoding steps need no device-to-host copy of the route ids
DECODER_SINGLE_ROUTE_KEY = "decoder_single_route"
# [CPU tensor] the decoder route ids on the host, in the batch's row order, when the collater's plan gave them; a
# reordering (beam search) drops it, since the new order lives on the device
DECODER_HOST_ROUTE_KEY = "decoder_route_ids_host"
ROUTE_PLAN_KEY = "route_plan"  # net_input key of the collater's RoutePlan
# the decoder output's extra dict holds the encoder output here when the model has a CTC projection
ENCODER_OUT_KEY = "encoder_out"


def add_checkpoint_activation_args(parser):
    """fairseq's transformer options for activation checkpointing, which ``s2t_transformer`` does not offer."""
    parser.add_argument("--checkpoint-activations", action="store_true",
                        help="recompute each decoder layer's activations in backward instead of storing them "
                             "(less memory, about one more decoder forward per step)")
    parser.add_argument("--offload-activations", action="store_true",
                        help="keep checkpointed activations on the CPU (implies --checkpoint-activations)")


def routing_table_from_args(args) -> RoutingTable:
    return RoutingTable(
        getattr(args, "encoder_routes", None) or DEFAULT_ENCODER_ROUTES,
        getattr(args, "decoder_routes", None) or DEFAULT_DECODER_ROUTES,
    )


def _check_plan(plan: Optional[RoutePlan], batch_size: int) -> Optional[RoutePlan]:
    if plan is None:
        return None
    if not isinstance(plan, RoutePlan):
        raise TypeError(f"{ROUTE_PLAN_KEY} must be a fairseq_smoe.routing.RoutePlan, got {type(plan).__name__}")
    if plan.batch_size != batch_size:
        raise ValueError(f"{ROUTE_PLAN_KEY} holds the routes of {plan.batch_size} samples for a batch of {batch_size}")
    return plan


class S2TSMoEEncoder(S2TTransformerEncoder):
    """fairseq's S2T encoder whose FFNs are bandwidth experts when ``num_experts > 1``.

    ``decoder_routed`` says whether the decoder has experts: only then does the encoder pass the decoder route
    ids on in its output (a dense decoder has no use for them, and beam search would reorder them every step).
    """

    def __init__(self, args, num_experts: int, decoder_routed: bool = True):
        super().__init__(args)
        self.num_experts = num_experts
        self.decoder_routed = decoder_routed
        self.route_context = RouteContext(num_experts, "encoder")
        if num_experts > 1:
            self.transformer_layers = nn.ModuleList(
                [
                    SMoETransformerEncoderLayer(args, num_experts, self.route_context)
                    for _ in range(args.encoder_layers)
                ]
            )

    def forward(
        self,
        src_tokens,
        src_lengths,
        encoder_route_ids: Optional[Tensor] = None,
        decoder_route_ids: Optional[Tensor] = None,
        return_all_hiddens: bool = False,
        route_plan: Optional[RoutePlan] = None,
    ):
        """``route_plan`` (from the collater) holds the same route ids on the host; without it (callers that pass
        only the id tensors) each id tensor a routed layer needs is copied to the host once."""
        plan = _check_plan(route_plan, src_tokens.size(0))
        # the decoder's routes are settled on the host before any encoder kernel is queued
        decoder_routes = self._decoder_routes(decoder_route_ids, plan)
        if self.num_experts > 1:
            host = None if plan is None else plan.encoder
            with self.route_context.use(encoder_route_ids, src_tokens.size(0), host_ids=host):
                out = super().forward(src_tokens, src_lengths, return_all_hiddens=return_all_hiddens)
        else:
            out = super().forward(src_tokens, src_lengths, return_all_hiddens=return_all_hiddens)
        out.update(decoder_routes)
        return out

    def _decoder_routes(self, decoder_route_ids: Optional[Tensor], plan: Optional[RoutePlan]):
        """The decoder's route entries of ``encoder_out``: ids, one-route flag, host copy of the ids."""
        routes: Dict[str, List[Tensor]] = {DECODER_ROUTE_KEY: [], DECODER_SINGLE_ROUTE_KEY: []}
        if not self.decoder_routed or decoder_route_ids is None:
            return routes  # a dense decoder: no route work at all
        routes[DECODER_ROUTE_KEY] = [decoder_route_ids]
        if plan is None:  # the ids only: their one host copy, before the encoder's kernels are queued
            host = decoder_route_ids.cpu().numpy()
        else:
            host = plan.decoder
        single = int(host[0]) if host.size and (host == host[0]).all() else None
        if single is None:
            routes[DECODER_HOST_ROUTE_KEY] = [torch.as_tensor(host)]
        routes[DECODER_SINGLE_ROUTE_KEY] = [] if single is None else [torch.tensor(single)]
        return routes

    def reorder_encoder_out(self, encoder_out: Dict[str, List[Tensor]], new_order):
        new = super().reorder_encoder_out(encoder_out, new_order)
        new[DECODER_ROUTE_KEY] = [x.index_select(0, new_order) for x in encoder_out.get(DECODER_ROUTE_KEY, [])]
        new[DECODER_SINGLE_ROUTE_KEY] = list(encoder_out.get(DECODER_SINGLE_ROUTE_KEY, []))
        # DECODER_HOST_ROUTE_KEY is left out: the new row order is a device tensor
        return new


class S2TSMoEDecoder(TransformerDecoderScriptable):
    """fairseq's S2T decoder whose FFNs are task experts when ``num_experts > 1``."""

    def __init__(self, args, dictionary, embed_tokens, num_experts: int):
        # used by build_decoder_layer, which the parent constructor calls
        self.num_experts = num_experts
        self.route_context = RouteContext(num_experts, "decoder")
        super().__init__(args, dictionary, embed_tokens)

    def build_decoder_layer(self, args, no_encoder_attn=False):
        if self.num_experts <= 1:
            return super().build_decoder_layer(args, no_encoder_attn)
        cfg = TransformerConfig.from_namespace(args)
        layer = SMoETransformerDecoderLayer(cfg, no_encoder_attn, self.num_experts, self.route_context)
        # wrap as fairseq's TransformerDecoderBase.build_decoder_layer does, with the routes re-bound in the
        # recomputation that activation checkpointing runs inside backward()
        checkpoint = cfg.checkpoint_activations
        if checkpoint:
            layer = checkpoint_routed_layer(layer, self.route_context, offload_to_cpu=cfg.offload_activations)
        min_params_to_wrap = cfg.min_params_to_wrap if not checkpoint else 0
        return fsdp_wrap(layer, min_num_params=min_params_to_wrap)

    def extract_features(
        self,
        prev_output_tokens,
        encoder_out: Optional[Dict[str, List[Tensor]]] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        full_context_alignment: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        if self.num_experts <= 1:
            return super().extract_features(
                prev_output_tokens, encoder_out, incremental_state,
                full_context_alignment, alignment_layer, alignment_heads,
            )
        routes, single, host = None, None, None
        if encoder_out is not None and len(encoder_out.get(DECODER_ROUTE_KEY, [])) > 0:
            routes = encoder_out[DECODER_ROUTE_KEY][0]
            if len(encoder_out.get(DECODER_SINGLE_ROUTE_KEY, [])) > 0:
                single = int(encoder_out[DECODER_SINGLE_ROUTE_KEY][0])  # a CPU tensor: no device sync
            elif len(encoder_out.get(DECODER_HOST_ROUTE_KEY, [])) > 0:
                host = encoder_out[DECODER_HOST_ROUTE_KEY][0].numpy()
        with self.route_context.use(routes, prev_output_tokens.size(0), single=single, host_ids=host):
            return super().extract_features(
                prev_output_tokens, encoder_out, incremental_state,
                full_context_alignment, alignment_layer, alignment_heads,
            )


@register_model("s2t_smoe")
class S2TSMoEModel(S2TTransformerModel):
    """Speech-to-text Transformer with supervised (metadata-routed) expert FFNs in encoder and/or decoder."""

    @staticmethod
    def add_args(parser):
        S2TTransformerModel.add_args(parser)
        add_checkpoint_activation_args(parser)
        parser.add_argument("--encoder-smoe", action="store_true",
                            help="one FFN expert per encoder route (input bandwidth) in every encoder layer")
        parser.add_argument("--decoder-smoe", action="store_true",
                            help="one FFN expert per decoder route (task guiding token) in every decoder layer")
        parser.add_argument("--encoder-routes", type=str, metavar="R1,R2",
                            help="encoder route names, in expert order (default: from config.yaml, else wb,nb)")
        parser.add_argument("--decoder-routes", type=str, metavar="R1,R2",
                            help="decoder route names, in expert order (default: from config.yaml, "
                                 "else transcribe,translate)")

    @classmethod
    def build_encoder(cls, args):
        table = routing_table_from_args(args)
        decoder_routed = bool(args.decoder_smoe) and table.num_decoder_routes > 1
        encoder = S2TSMoEEncoder(args, table.num_encoder_routes if args.encoder_smoe else 1, decoder_routed)
        pretraining_path = getattr(args, "load_pretrained_encoder_from", None)
        if pretraining_path is not None:
            if not Path(pretraining_path).exists():
                raise FileNotFoundError(f"--load-pretrained-encoder-from: no such file {pretraining_path}")
            encoder = checkpoint_utils.load_pretrained_component_from_model(
                component=encoder, checkpoint=pretraining_path
            )
            logger.info(f"loaded pretrained encoder from: {pretraining_path}")
        return encoder

    @classmethod
    def build_decoder(cls, args, task, embed_tokens):
        table = routing_table_from_args(args)
        n = table.num_decoder_routes if args.decoder_smoe else 1
        return S2TSMoEDecoder(args, task.target_dictionary, embed_tokens, n)

    @classmethod
    def build_model(cls, args, task):
        base_architecture(args)
        model = super().build_model(args, task)
        model.routing_table = routing_table_from_args(args)
        return model

    def forward(
        self,
        src_tokens,
        src_lengths,
        prev_output_tokens,
        encoder_route_ids: Optional[Tensor] = None,
        decoder_route_ids: Optional[Tensor] = None,
        route_plan: Optional[RoutePlan] = None,
    ):
        encoder_out = self.encoder(
            src_tokens=src_tokens,
            src_lengths=src_lengths,
            encoder_route_ids=encoder_route_ids,
            decoder_route_ids=decoder_route_ids,
            route_plan=route_plan,
        )
        decoder_out = self.decoder(prev_output_tokens=prev_output_tokens, encoder_out=encoder_out)
        if self.encoder.ctc_proj is not None:  # for the auxiliary CTC loss (label_smoothed_cross_entropy_asr_ctc)
            decoder_out[1][ENCODER_OUT_KEY] = encoder_out
        return decoder_out


# ---------------------------------------------------------------------------------------------------------------
# Architectures. Paper size: d 512, FFN 2048, 8 heads, 12 encoder / 6 decoder layers, untied output embedding.
# ---------------------------------------------------------------------------------------------------------------


def base_architecture(args):
    args.encoder_smoe = getattr(args, "encoder_smoe", False)
    args.decoder_smoe = getattr(args, "decoder_smoe", False)
    args.encoder_routes = getattr(args, "encoder_routes", None)
    args.decoder_routes = getattr(args, "decoder_routes", None)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 512)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 2048)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 8)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 8)
    args.encoder_layers = getattr(args, "encoder_layers", 12)
    args.decoder_layers = getattr(args, "decoder_layers", 6)
    args.share_decoder_input_output_embed = getattr(args, "share_decoder_input_output_embed", False)
    args.dropout = getattr(args, "dropout", 0.1)
    args.offload_activations = getattr(args, "offload_activations", False)
    # as fairseq's transformer does: offloading is a form of checkpointing
    args.checkpoint_activations = getattr(args, "checkpoint_activations", False) or args.offload_activations
    s2t_base_architecture(args)


def _size_s(args):
    """Small data (tens to a few hundred hours): d 256, FFN 1024, 4 heads, 12/6 layers."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 256)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 1024)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    args.conv_channels = getattr(args, "conv_channels", 512)


def _size_xs(args):
    """CPU demos and tests: d 128, FFN 512, 4 heads, 6/3 layers."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 128)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 512)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    args.encoder_layers = getattr(args, "encoder_layers", 6)
    args.decoder_layers = getattr(args, "decoder_layers", 3)
    args.conv_channels = getattr(args, "conv_channels", 256)
    args.dropout = getattr(args, "dropout", 0.15)


def _variant_base(args):
    """Hard sharing: one FFN per layer for every bandwidth and task (the paper's Base)."""
    args.encoder_smoe = getattr(args, "encoder_smoe", False)
    args.decoder_smoe = getattr(args, "decoder_smoe", False)


def _variant_dec_ffnx2(args):
    """Hard sharing with a decoder FFN twice as wide: DecS-MoE's parameter count without the routing."""
    _variant_base(args)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", 2 * args.encoder_ffn_embed_dim)


def _variant_dec_smoe(args):
    args.encoder_smoe = getattr(args, "encoder_smoe", False)
    args.decoder_smoe = getattr(args, "decoder_smoe", True)


def _variant_enc_smoe(args):
    args.encoder_smoe = getattr(args, "encoder_smoe", True)
    args.decoder_smoe = getattr(args, "decoder_smoe", False)


def _variant_encdec_smoe(args):
    args.encoder_smoe = getattr(args, "encoder_smoe", True)
    args.decoder_smoe = getattr(args, "decoder_smoe", True)


# the size functions by name ("paper": base_architecture's own defaults); s2t_lmoe's table reads them too
SIZES = {"paper": None, "s": _size_s, "xs": _size_xs}

# Every registered architecture, by its literal name: name -> (size, variant). The paper's four systems are Base,
# DecFFNx2, DecS-MoE and EncDecS-MoE; EncS-MoE is the encoder-only ablation.
ARCH_TABLE = {
    "s2t_smoe_base": ("paper", _variant_base),
    "s2t_smoe_base_s": ("s", _variant_base),
    "s2t_smoe_base_xs": ("xs", _variant_base),
    "s2t_dec_ffnx2": ("paper", _variant_dec_ffnx2),
    "s2t_dec_ffnx2_s": ("s", _variant_dec_ffnx2),
    "s2t_dec_ffnx2_xs": ("xs", _variant_dec_ffnx2),
    "s2t_dec_smoe": ("paper", _variant_dec_smoe),
    "s2t_dec_smoe_s": ("s", _variant_dec_smoe),
    "s2t_dec_smoe_xs": ("xs", _variant_dec_smoe),
    "s2t_enc_smoe": ("paper", _variant_enc_smoe),
    "s2t_enc_smoe_s": ("s", _variant_enc_smoe),
    "s2t_enc_smoe_xs": ("xs", _variant_enc_smoe),
    "s2t_encdec_smoe": ("paper", _variant_encdec_smoe),
    "s2t_encdec_smoe_s": ("s", _variant_encdec_smoe),
    "s2t_encdec_smoe_xs": ("xs", _variant_encdec_smoe),
}


def _register(arch_name: str, size: str, variant_fn):
    size_fn = SIZES[size]

    def arch(args):
        if size_fn is not None:
            size_fn(args)
        # the size fixes the encoder FFN width first, so DecFFNx2 doubles the right one
        args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 2048)
        variant_fn(args)
        base_architecture(args)

    arch.__name__ = arch_name
    arch.__doc__ = f"{variant_fn.__doc__ or arch_name} Size: {size_fn.__doc__ if size_fn else 'paper'}"
    register_model_architecture("s2t_smoe", arch_name)(arch)
    return arch


ARCHITECTURES = {name: _register(name, size, variant_fn) for name, (size, variant_fn) in ARCH_TABLE.items()}

# the generic model name also needs an architecture of the same name
register_model_architecture("s2t_smoe", "s2t_smoe")(base_architecture)
