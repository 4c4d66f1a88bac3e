"""The learned-gate MoE baseline: the same S2T Transformers with top-1 switch-routed FFN experts.

Same sizes and the same number of experts per FFN as S-MoE (by default as many as the routing table has encoder /
decoder routes), but a learned per-token router chooses the expert instead of the sample's bandwidth or task. It
is the paper's open comparison (supervised vs learned routing) and the speed reference of ``benchmarks/``.
Route ids in ``net_input`` are accepted and ignored, so it trains and decodes with ``--task speech_to_text_smoe``.
Train it with ``--criterion label_smoothed_cross_entropy_moe`` so the load-balancing loss is optimised, or with
``--criterion label_smoothed_cross_entropy_moe_asr_ctc --ctc-weight W`` for that plus the auxiliary CTC loss on ASR
rows (the S-MoE systems' ``label_smoothed_cross_entropy_asr_ctc``): with ``--ctc-weight`` > 0 fairseq's encoder
builds its CTC projection, the forward returns the encoder output for it (as s2t_smoe does), and
``fairseq-generate --ctc-decode-weight`` decodes ASR rows with joint CTC/attention search.

Host syncs: unlike S-MoE, whose routes the collater knows on the host, the router decides on the device in the
middle of the forward, so every switch layer needs its per-expert split sizes on the host: one device-to-host read
per switch layer and step (``tests/test_host_transfers.py`` holds that budget).
"""

import functools
import logging

from torch import nn

from fairseq.distributed import fsdp_wrap
from fairseq.models import register_model, register_model_architecture
from fairseq.models.speech_to_text.s2t_transformer import (
    S2TTransformerEncoder,
    S2TTransformerModel,
    TransformerDecoderScriptable,
)
from fairseq.models.transformer import TransformerConfig
from fairseq.modules.checkpoint_activations import checkpoint_wrapper

from ..modules.switch_layer import (
    AuxLossCollector,
    SwitchLinear,
    SwitchState,
    SwitchTransformerDecoderLayer,
    SwitchTransformerEncoderLayer,
)
from .s2t_smoe import (
    ENCODER_OUT_KEY,
    SIZES,
    add_checkpoint_activation_args,
    base_architecture as smoe_base_architecture,
    routing_table_from_args,
)

logger = logging.getLogger(__name__)

MOE_CRITERION = "label_smoothed_cross_entropy_moe"
MOE_ASR_CTC_CRITERION = "label_smoothed_cross_entropy_moe_asr_ctc"  # the same + CTC on ASR rows (--ctc-weight)
BALANCING_CRITERIA = (MOE_CRITERION, MOE_ASR_CTC_CRITERION)  # the criteria that optimise the balancing loss
AUX_KEY = "moe_router_stats"  # net_output[1][AUX_KEY]: one dict per switch layer (aux_loss, dropped)


def _switch_state(args, num_experts: int) -> SwitchState:
    return SwitchState(num_experts, args.moe_capacity_factor, args.moe_eval_capacity_factor)


def checkpoint_switch_layer(layer: nn.Module, state: SwitchState, offload_to_cpu: bool = False) -> nn.Module:
    """fairseq's ``checkpoint_wrapper`` for a switch layer, with its router statistics kept differentiable.

    The checkpointed forward runs without autograd and is run again inside ``backward()``: an aux loss recorded
    by the first run would carry no gradient to the router, and a record made by the recomputation would come
    too late and twice. So the layer's own records are collected privately, in both runs, and returned as two
    extra outputs of the checkpointed call (the recomputation's aux loss is what autograd differentiates); the
    outer forward hands that one record to the model's collector. The patch is on ``forward`` only, as
    ``checkpoint_wrapper``'s is, so the state-dict keys are those of the unwrapped layer.
    """
    layer.forward = functools.partial(_forward_returning_router_stats, layer.forward, state)
    layer = checkpoint_wrapper(layer, offload_to_cpu=offload_to_cpu)
    layer.forward = functools.partial(_forward_recording_router_stats, layer.forward, state)
    return layer


def _forward_recording_router_stats(checkpointed_forward, state: SwitchState, *args, **kwargs):
    collector = state.collector
    collect = collector is not None and collector.active
    out = checkpointed_forward(*args, smoe_collect=collect, **kwargs)
    if not collect:
        return out
    *out, aux_loss, dropped = out
    collector.add({"aux_loss": aux_loss, "dropped": dropped})
    return tuple(out)


def _forward_returning_router_stats(forward, state: SwitchState, *args, smoe_collect: bool = False, **kwargs):
    collector = state.collector
    if collector is None:
        return forward(*args, **kwargs)
    if not smoe_collect:  # nothing is collected in this run, nor in its recomputation
        previous, collector.records = collector.records, None
        try:
            return forward(*args, **kwargs)
        finally:
            collector.records = previous
    with collector.collect() as records:
        out = forward(*args, **kwargs)
    if len(records) != 1:
        raise RuntimeError(f"a switch decoder layer made {len(records)} router records, expected 1")
    return (*out, records[0]["aux_loss"], records[0]["dropped"])


class S2TLMoEEncoder(S2TTransformerEncoder):
    """fairseq's S2T encoder whose FFNs are switch-routed experts when ``num_experts > 1``."""

    def __init__(self, args, num_experts: int):
        super().__init__(args)
        self.num_experts = num_experts
        if num_experts > 1:
            self.transformer_layers = nn.ModuleList(
                [SwitchTransformerEncoderLayer(args, _switch_state(args, num_experts))
                 for _ in range(args.encoder_layers)]
            )

    def forward(self, src_tokens, src_lengths, return_all_hiddens: bool = False, **route_ids):
        """``encoder_route_ids`` / ``decoder_route_ids`` from the S-MoE collater are ignored: the router decides."""
        return super().forward(src_tokens, src_lengths, return_all_hiddens=return_all_hiddens)


class S2TLMoEDecoder(TransformerDecoderScriptable):
    """fairseq's S2T decoder whose FFNs are switch-routed experts when ``num_experts > 1``."""

    def __init__(self, args, dictionary, embed_tokens, num_experts: int):
        self.num_experts = num_experts  # used by build_decoder_layer, which the parent constructor calls
        super().__init__(args, dictionary, embed_tokens)

    def build_decoder_layer(self, args, no_encoder_attn=False):
        if self.num_experts <= 1:
            return super().build_decoder_layer(args, no_encoder_attn)
        cfg = TransformerConfig.from_namespace(args)
        layer = SwitchTransformerDecoderLayer(cfg, no_encoder_attn, _switch_state(args, self.num_experts))
        checkpoint = cfg.checkpoint_activations  # wrap as fairseq's build_decoder_layer does
        if checkpoint:
            layer = checkpoint_switch_layer(layer, layer.switch_state, offload_to_cpu=cfg.offload_activations)
        return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


@register_model("s2t_lmoe")
class S2TLMoEModel(S2TTransformerModel):
    """Speech-to-text Transformer with learned top-1 (switch) routed expert FFNs in encoder and/or decoder."""

    @staticmethod
    def add_args(parser):
        S2TTransformerModel.add_args(parser)
        add_checkpoint_activation_args(parser)
        parser.add_argument("--encoder-lmoe", action="store_true",
                            help="switch-routed FFN experts in every encoder layer")
        parser.add_argument("--decoder-lmoe", action="store_true",
                            help="switch-routed FFN experts in every decoder layer")
        parser.add_argument("--encoder-experts", type=int, metavar="N",
                            help="experts per encoder FFN (default: as many as encoder routes, like S-MoE)")
        parser.add_argument("--decoder-experts", type=int, metavar="N",
                            help="experts per decoder FFN (default: as many as decoder routes, like S-MoE)")
        parser.add_argument("--moe-capacity-factor", type=float, metavar="F",
                            help="training: an expert takes at most ceil(F * tokens / experts) tokens, the rest "
                                 "skip the FFN (default 1.25)")
        parser.add_argument("--moe-eval-capacity-factor", type=float, metavar="F",
                            help="the same at validation and inference (default 2.0)")

    @classmethod
    def build_model(cls, args, task):
        base_architecture(args)
        table = routing_table_from_args(args)
        # resolved once and saved in the checkpoint, so a later routing table cannot change the expert count
        if args.encoder_experts is None:
            args.encoder_experts = table.num_encoder_routes if args.encoder_lmoe else 1
        if args.decoder_experts is None:
            args.decoder_experts = table.num_decoder_routes if args.decoder_lmoe else 1
        criterion = getattr(args, "criterion", None)
        if criterion is not None and criterion not in BALANCING_CRITERIA:
            logger.warning(f"--criterion {criterion} does not optimise the switch load-balancing loss; "
                           f"use --criterion {MOE_CRITERION} (or {MOE_ASR_CTC_CRITERION} --ctc-weight W, "
                           f"with the auxiliary CTC loss)")
        model = super().build_model(args, task)
        model.routing_table = table
        model.router_stats = AuxLossCollector()
        for module in model.modules():
            if isinstance(module, SwitchLinear):
                module.state.collector = model.router_stats
        return model

    @classmethod
    def build_encoder(cls, args):
        if getattr(args, "load_pretrained_encoder_from", None):
            raise ValueError("--load-pretrained-encoder-from is not supported for s2t_lmoe models")
        return S2TLMoEEncoder(args, args.encoder_experts)

    @classmethod
    def build_decoder(cls, args, task, embed_tokens):
        return S2TLMoEDecoder(args, task.target_dictionary, embed_tokens, args.decoder_experts)

    def forward(self, src_tokens, src_lengths, prev_output_tokens, **route_ids):
        """Full forward (training/validation): the decoder's extra output carries every switch layer's stats, and,
        when the encoder has a CTC projection, the encoder output (for the auxiliary CTC loss). fairseq's scriptable
        S2T decoder happens to put the encoder output under that key already; it is set here explicitly, as
        s2t_smoe does, so that the CTC criteria rest on this model's contract, not on that detail."""
        with self.router_stats.collect() as records:
            encoder_out = self.encoder(src_tokens=src_tokens, src_lengths=src_lengths)
            x, extra = self.decoder(prev_output_tokens=prev_output_tokens, encoder_out=encoder_out)
        extra[AUX_KEY] = records
        if self.encoder.ctc_proj is not None:
            extra[ENCODER_OUT_KEY] = encoder_out
        return x, extra


def base_architecture(args):
    args.encoder_lmoe = getattr(args, "encoder_lmoe", False)
    args.decoder_lmoe = getattr(args, "decoder_lmoe", False)
    args.encoder_experts = getattr(args, "encoder_experts", None)
    args.decoder_experts = getattr(args, "decoder_experts", None)
    args.moe_capacity_factor = getattr(args, "moe_capacity_factor", None) or 1.25
    args.moe_eval_capacity_factor = getattr(args, "moe_eval_capacity_factor", None) or 2.0
    smoe_base_architecture(args)


def _variant(encoder: bool, decoder: bool, doc: str):
    def variant(args):
        args.encoder_lmoe = getattr(args, "encoder_lmoe", encoder)
        args.decoder_lmoe = getattr(args, "decoder_lmoe", decoder)

    variant.__doc__ = doc
    return variant


_dec_lmoe = _variant(False, True, "Decoder FFNs are switch-routed experts.")
_enc_lmoe = _variant(True, False, "Encoder FFNs are switch-routed experts.")
_encdec_lmoe = _variant(True, True, "Encoder and decoder FFNs are switch-routed experts.")


# Every registered architecture, by its literal name: name -> (size, variant); sizes as in s2t_smoe.SIZES
ARCH_TABLE = {
    "s2t_dec_lmoe": ("paper", _dec_lmoe),
    "s2t_dec_lmoe_s": ("s", _dec_lmoe),
    "s2t_dec_lmoe_xs": ("xs", _dec_lmoe),
    "s2t_enc_lmoe": ("paper", _enc_lmoe),
    "s2t_enc_lmoe_s": ("s", _enc_lmoe),
    "s2t_enc_lmoe_xs": ("xs", _enc_lmoe),
    "s2t_encdec_lmoe": ("paper", _encdec_lmoe),
    "s2t_encdec_lmoe_s": ("s", _encdec_lmoe),
    "s2t_encdec_lmoe_xs": ("xs", _encdec_lmoe),
}


def _register(arch_name: str, size: str, variant_fn):
    size_fn = SIZES[size]

    def arch(args):
        if size_fn is not None:
            size_fn(args)
        variant_fn(args)
        base_architecture(args)

    arch.__name__ = arch_name
    arch.__doc__ = f"{variant_fn.__doc__} Size: {size_fn.__doc__ if size_fn else 'paper'}"
    register_model_architecture("s2t_lmoe", arch_name)(arch)
    return arch


ARCHITECTURES = {name: _register(name, size, variant_fn) for name, (size, variant_fn) in ARCH_TABLE.items()}

register_model_architecture("s2t_lmoe", "s2t_lmoe")(base_architecture)
