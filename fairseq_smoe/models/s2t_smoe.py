"""S2T Transformer with Supervised-MoE feed-forward layers (the paper's Base, DecFFNx2, DecS-MoE, EncDecS-MoE).

Everything but the FFNs is fairseq's ``s2t_transformer``: the convolutional subsampler, attention, embeddings and
the incremental decoder. The encoder FFNs are routed by input bandwidth, the decoder FFNs by the task guiding
token; both route-id vectors arrive in ``net_input`` from the ``speech_to_text_smoe`` collater. Decoder route ids
travel inside ``encoder_out`` so that beam search's ``reorder_encoder_out`` keeps them aligned with the
hypotheses, and incremental decoding (which only sees the last token) still knows each row's task.
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
from fairseq.modules.checkpoint_activations import checkpoint_wrapper

from ..expert_layer import SMoETransformerDecoderLayer, SMoETransformerEncoderLayer
from ..routing import DEFAULT_DECODER_ROUTES, DEFAULT_ENCODER_ROUTES, RouteContext, RoutingTable, single_route_of

logger = logging.getLogger(__name__)

ENCODER_ROUTE_KEY = "encoder_route_ids"
DECODER_ROUTE_KEY = "decoder_route_ids"
# [CPU scalar tensor] when every row of the batch takes one decoder route, else []: any beam-search reordering keeps
# a one-route batch one-route, so incremental decoding steps need no device-to-host copy of the route ids
DECODER_SINGLE_ROUTE_KEY = "decoder_single_route"
# the decoder output's extra dict holds the encoder output here when the model has a CTC projection
ENCODER_OUT_KEY = "encoder_out"


def routing_table_from_args(args) -> RoutingTable:
    return RoutingTable(
        getattr(args, "encoder_routes", None) or DEFAULT_ENCODER_ROUTES,
        getattr(args, "decoder_routes", None) or DEFAULT_DECODER_ROUTES,
    )


class S2TSMoEEncoder(S2TTransformerEncoder):
    """fairseq's S2T encoder whose FFNs are bandwidth experts when ``num_experts > 1``."""

    def __init__(self, args, num_experts: int):
        super().__init__(args)
        self.num_experts = num_experts
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
    ):
        if self.num_experts > 1:
            with self.route_context.use(encoder_route_ids, src_tokens.size(0)):
                out = super().forward(src_tokens, src_lengths, return_all_hiddens=return_all_hiddens)
        else:
            out = super().forward(src_tokens, src_lengths, return_all_hiddens=return_all_hiddens)
        out[DECODER_ROUTE_KEY] = [] if decoder_route_ids is None else [decoder_route_ids]
        single = None if decoder_route_ids is None else single_route_of(decoder_route_ids)
        out[DECODER_SINGLE_ROUTE_KEY] = [] if single is None else [torch.tensor(single)]
        return out

    def reorder_encoder_out(self, encoder_out: Dict[str, List[Tensor]], new_order):
        new = super().reorder_encoder_out(encoder_out, new_order)
        new[DECODER_ROUTE_KEY] = [x.index_select(0, new_order) for x in encoder_out.get(DECODER_ROUTE_KEY, [])]
        new[DECODER_SINGLE_ROUTE_KEY] = list(encoder_out.get(DECODER_SINGLE_ROUTE_KEY, []))
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
        # wrap exactly as fairseq's TransformerDecoderBase.build_decoder_layer does
        checkpoint = cfg.checkpoint_activations
        if checkpoint:
            layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
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
        routes, single = None, None
        if encoder_out is not None and len(encoder_out.get(DECODER_ROUTE_KEY, [])) > 0:
            routes = encoder_out[DECODER_ROUTE_KEY][0]
            if len(encoder_out.get(DECODER_SINGLE_ROUTE_KEY, [])) > 0:
                single = int(encoder_out[DECODER_SINGLE_ROUTE_KEY][0])
        with self.route_context.use(routes, prev_output_tokens.size(0), single=single):
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
        encoder = S2TSMoEEncoder(args, table.num_encoder_routes if args.encoder_smoe else 1)
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
    ):
        encoder_out = self.encoder(
            src_tokens=src_tokens,
            src_lengths=src_lengths,
            encoder_route_ids=encoder_route_ids,
            decoder_route_ids=decoder_route_ids,
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


_SIZES = {"": None, "_s": _size_s, "_xs": _size_xs}
_VARIANTS = {
    "s2t_smoe_base": _variant_base,
    "s2t_dec_ffnx2": _variant_dec_ffnx2,
    "s2t_dec_smoe": _variant_dec_smoe,
    "s2t_enc_smoe": _variant_enc_smoe,
    "s2t_encdec_smoe": _variant_encdec_smoe,
}
# the paper's four systems, in the order its tables list them
PAPER_SYSTEMS = ("s2t_smoe_base", "s2t_dec_ffnx2", "s2t_dec_smoe", "s2t_encdec_smoe")


def _register(arch_name: str, size_fn, variant_fn):
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


ARCHITECTURES = {}
for _variant, _variant_fn in _VARIANTS.items():
    for _suffix, _size_fn in _SIZES.items():
        ARCHITECTURES[_variant + _suffix] = _register(_variant + _suffix, _size_fn, _variant_fn)

# the generic model name also needs an architecture of the same name
register_model_architecture("s2t_smoe", "s2t_smoe")(base_architecture)
