"""``speech_to_text_smoe``: fairseq's S2T task plus guiding-token prefixes, S-MoE routes and WER/BLEU validation.

What it adds to ``speech_to_text``:

* targets start with a guiding prefix (``<transcribe> <lang:en>`` / ``<translate> <lang:es>``) built from the
  manifest's ``task`` and ``tgt_lang`` by :class:`~fairseq_smoe.routing.RoutingTable` (``smoe.tasks`` in
  config.yaml maps tasks to guiding tokens: a new task is configuration and vocabulary only); criteria never score
  it, the generator forces it, and it is stripped from hypotheses;
* every batch carries encoder (bandwidth) and decoder (task) route ids in ``net_input``;
* ``--force-task`` / ``--force-tgt-lang`` decode a test set as another task (e.g. an ASR set as ST);
* ``--ctc-decode-weight`` decodes ASR rows with joint CTC/attention beam search
  (:mod:`fairseq_smoe.decoding.joint_ctc`);
* validation decodes greedily and logs ``wer`` (rows of ``smoe.asr_tasks``) and ``bleu`` (the other rows), usable
  as ``--best-checkpoint-metric``; every batch logs the same keys, so that several processes can sum them;
* precision: ``fairseq-generate --fp16`` feeds the halved model half inputs; ``--amp --amp-dtype bfloat16`` trains,
  validates and decodes under ``torch.autocast`` in bf16 on CUDA or the CPU, and ``--bf16`` (which fairseq reserves
  for TPUs) is refused without torch_xla, naming that route.
"""

import contextlib
import importlib.util
import logging
from argparse import Namespace
from pathlib import Path

import torch

from fairseq import utils
from fairseq.logging import metrics
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import FairseqTask, register_task
from fairseq.tasks.speech_to_text import SpeechToTextTask

from ..scoring import evaluation
from ..checkpoint import signature as model_signature
from ..data.config import ConfigError, SMoEDataConfig
from ..data.dataset import SMoEDatasetCreator
from ..decoding.joint_ctc import JointCtcAttentionEnsemble
from ..routing import RoutingTable, asr_rows_of, guiding_token

logger = logging.getLogger(__name__)

RoutingMismatchError = model_signature.RoutingMismatchError  # what check_model_args_routes raises


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

BF16_REFUSAL = (
    "fairseq reserves --bf16 for TPUs (it sets --tpu, and the trainer then asks torch_xla for a device), and "
    "torch_xla is not installed. For bf16 on a GPU (or the CPU) use --amp --amp-dtype bfloat16: bf16 autocast "
    "with fp32 master weights, for fairseq-train and fairseq-generate"
)


def have_torch_xla() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


def _cuda_has_native_bf16() -> bool:
    """bf16 in hardware (Ampere and later): torch's default also says yes for GPUs that only emulate it, slowly."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no emulation flag and answers for the hardware
        return torch.cuda.is_bf16_supported()


def refuse_bf16_without_xla(parser) -> None:
    """Make ``--bf16`` / ``--memory-efficient-bf16`` a parser error, naming ``--amp --amp-dtype bfloat16``, unless
    torch_xla is installed (a TPU host, where fairseq's bf16 works).

    The parser's own action object is kept (its help, defaults and groups stay) and given a subclass of its class
    whose ``__call__`` checks first: the option is found only when it is used, so the check costs nothing otherwise.
    """
    for option in ("--bf16", "--memory-efficient-bf16"):
        action = parser._option_string_actions.get(option)
        if action is None or getattr(action, "smoe_refuses_without_xla", False):
            continue
        base = type(action)

        def __call__(self, parser, namespace, values, option_string=None, _base=base):
            if not have_torch_xla():
                parser.error(f"{option_string}: {BF16_REFUSAL}")
            _base.__call__(self, parser, namespace, values, option_string)

        action.__class__ = type(f"{base.__name__}NeedsTorchXla", (base,),
                                {"__call__": __call__, "smoe_refuses_without_xla": True})


@register_task("speech_to_text_smoe")
class SpeechToTextSMoETask(SpeechToTextTask):
    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        parser.add_argument("--force-task", default=None, metavar="TASK",
                            help="decode every row as this task (one of config.yaml's smoe.tasks; default asr, st), "
                                 "whatever the manifest says (sets the guiding token and the decoder route)")
        parser.add_argument("--force-tgt-lang", type=str, default=None, metavar="LANG",
                            help="decode every row into this target language (sets the <lang:xx> tag)")
        parser.add_argument("--no-eval-scores", action="store_true",
                            help="skip the greedy decoding that reports WER/BLEU at validation")
        parser.add_argument("--eval-max-len-b", type=int, default=200, metavar="N",
                            help="maximum hypothesis length when decoding at validation")
        parser.add_argument("--ctc-decode-weight", type=float, default=0.0, metavar="W",
                            help="joint CTC/attention beam search for ASR rows: score = (1-W) decoder + W CTC "
                                 "prefix score, with the model's CTC head (0: the decoder alone)")
        parser.add_argument("--ctc-prebeam", type=int, default=30, metavar="K",
                            help="with --ctc-decode-weight: CTC-score the K best decoder tokens per hypothesis")
        parser.add_argument("--skip-bad-samples", action="store_true",
                            help="skip manifest rows with problems and audio that cannot be read, count them and "
                                 "log each one, instead of stopping at the first (the default)")
        parser.add_argument("--amp-dtype", choices=sorted(AMP_DTYPES), default="float16",
                            help="with --amp: the dtype of torch.autocast for training, validation and decoding "
                                 "(bfloat16: bf16 on CUDA or the CPU; fairseq's --bf16 is for TPUs only)")
        refuse_bf16_without_xla(parser)

    def __init__(self, args, tgt_dict):
        self._check_precision_args(args)  # before loading anything: a start-up error, for hydra entry points too
        super().__init__(args, tgt_dict)
        config_path = Path(args.data) / args.config_yaml
        self.smoe_cfg = SMoEDataConfig.from_dict(self.data_cfg.config.get("smoe"), where=str(config_path))
        self.routing_table: RoutingTable = self.smoe_cfg.routing_table
        missing = [guiding_token(t) for t in self.routing_table.task_tokens()
                   if tgt_dict.index(guiding_token(t)) == tgt_dict.unk()]
        if missing:
            raise ConfigError(
                f"{Path(args.data) / self.data_cfg.vocab_filename}: guiding token(s) {missing} missing from the "
                f"dictionary; build it with `python -m fairseq_smoe.data.vocab` (or add them as SentencePiece "
                f"user-defined symbols)"
            )
        force_task = getattr(args, "force_task", None)
        if force_task and force_task not in self.routing_table.tasks:
            raise ConfigError(f"--force-task {force_task}: not a task of {config_path} (smoe.tasks): "
                              f"{list(self.routing_table.tasks)}")
        self.guiding_token_ids = self.routing_table.guiding_token_ids(tgt_dict)
        self._eval_bpe = None
        self._logged_amp_dtype = set()  # the phases ("training", "decoding") whose autocast dtype was logged
        self._logged_shards = set()
        logger.info(f"S-MoE routing: {self.routing_table}; batches homogeneous: {self.smoe_cfg.homogeneous_batches}")

    # ------------------------------------------------------------- precision
    @staticmethod
    def _check_precision_args(args):
        if (getattr(args, "bf16", False) or getattr(args, "memory_efficient_bf16", False)) and not have_torch_xla():
            raise ConfigError(f"--bf16: {BF16_REFUSAL}")
        amp_dtype = getattr(args, "amp_dtype", "float16")
        if amp_dtype not in AMP_DTYPES:
            raise ConfigError(f"--amp-dtype {amp_dtype}: choose one of {sorted(AMP_DTYPES)}")
        if amp_dtype != "float16" and not getattr(args, "amp", False):
            raise ConfigError(f"--amp-dtype {amp_dtype} takes effect with --amp only: add --amp (or drop "
                              f"--amp-dtype for fp32 / --fp16)")
        if (amp_dtype == "bfloat16" and getattr(args, "amp", False) and not getattr(args, "cpu", False)
                and torch.cuda.is_available() and not _cuda_has_native_bf16()):
            raise ConfigError(f"--amp --amp-dtype bfloat16: {torch.cuda.get_device_name()} has no bf16 support; "
                              f"use --amp (float16) or --fp16")

    def amp_context(self, model, enabled=True):
        """``torch.autocast`` in ``--amp-dtype`` on the model's device under ``--amp``, else a null context.

        Used instead of FairseqTask's ``torch.cuda.amp.autocast``, which is CUDA-only and always fp16: the same
        context for training, validation and decoding, on CUDA or the CPU. Parameters stay fp32 (master weights);
        fairseq's AMPOptimizer still scales the loss (a no-op need for bf16, harmless).
        """
        if not (enabled and getattr(self.args, "amp", False)):
            return contextlib.nullcontext()
        param = next(model.parameters(), None)
        device_type = param.device.type if param is not None else "cpu"
        return torch.autocast(device_type=device_type, dtype=AMP_DTYPES[getattr(self.args, "amp_dtype", "float16")])

    @contextlib.contextmanager
    def _log_autocast_dtype_once(self, model, phase):
        """Log, once per run and phase, the dtype the decoder's logits really come out in under ``--amp``: shows
        that autocast reached the model (the parameters stay fp32, so their dtype would not tell)."""
        decoder = getattr(getattr(model, "module", model), "decoder", None)
        # the output projection, not the decoder: fairseq's generator calls decoder.forward(), which skips hooks
        layer = getattr(decoder, "output_projection", None)
        if (phase in self._logged_amp_dtype or not getattr(self.args, "amp", False)
                or not isinstance(layer, torch.nn.Module)):
            yield
            return
        self._logged_amp_dtype.add(phase)

        def hook(module, inputs, output):
            handle.remove()  # once: a decoding step calls it per output position
            logits = output[0] if isinstance(output, (tuple, list)) else output
            logger.info(f"--amp --amp-dtype {getattr(self.args, 'amp_dtype', 'float16')}: {phase}: decoder logits "
                        f"computed in {logits.dtype} on {logits.device.type}")

        handle = layer.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    # ------------------------------------------------------------------ data
    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        is_train_split = split.startswith("train")
        if (self.args.force_task or self.args.force_tgt_lang) and is_train_split:
            logger.warning(f"--force-task/--force-tgt-lang apply to the training split {split} too")
        self.datasets[split] = SMoEDatasetCreator.from_tsv(
            root=self.args.data,
            cfg=self.data_cfg,
            smoe_cfg=self.smoe_cfg,
            splits=split,
            tgt_dict=self.tgt_dict,
            pre_tokenizer=self.build_tokenizer(self.args),
            bpe_tokenizer=self.build_bpe(self.args),
            is_train_split=is_train_split,
            force_task=getattr(self.args, "force_task", None),
            force_tgt_lang=getattr(self.args, "force_tgt_lang", None),
            seed=getattr(self.args, "seed", 1),
            skip_bad_samples=getattr(self.args, "skip_bad_samples", False),
        )

    def get_batch_iterator(self, dataset, *args, num_workers=0, data_buffer_size=0, **kwargs):
        """fairseq's iterator, without its prefetch thread when there are no data-loader workers.

        With ``--num-workers 0`` fairseq's prefetch thread (``--data-buffer-size``) would run our audio decoding and
        fbank itself. It is a daemon thread: when training ends while it is inside torch's C++ code, Python 3.11
        kills it there at exit and the process aborts ("terminate called without an active exception", status 134)
        after a successful run. Measured: 1 run in 3 of a 30-update CPU training. Workers are processes, so with
        ``--num-workers N`` the buffer stays.
        """
        if num_workers == 0 and data_buffer_size > 0:
            data_buffer_size = 0
        itr = super().get_batch_iterator(
            dataset, *args, num_workers=num_workers, data_buffer_size=data_buffer_size, **kwargs
        )
        self._log_sharding(dataset, itr, kwargs.get("num_shards", 1))
        return itr

    def _log_sharding(self, dataset, itr, num_shards):
        """Say, once per dataset, how its batches split over the processes and how many stand-ins pad the shards.

        fairseq gives every process the same number of batches: when the count is not a multiple of the number of
        processes, the short shards get stand-in batches (run with ``ignore_grad``, their logging outputs zeroed).
        """
        batches = getattr(itr, "frozen_batches", None)
        if num_shards <= 1 or batches is None or id(dataset) in self._logged_shards:
            return
        self._logged_shards.add(id(dataset))
        pad = -len(batches) % num_shards
        logger.info(f"{len(batches)} batches over {num_shards} processes: {pad} stand-in batch(es) pad the shards")

    # ----------------------------------------------------------------- model
    def build_model(self, args, from_checkpoint=False):
        self._check_or_set_routes(args)
        model = super().build_model(args, from_checkpoint)
        # self.args, not the model args: those come from the checkpoint at decoding time, with its training data dir
        dict_path = str(Path(self.args.data) / self.data_cfg.vocab_filename)
        model_signature.attach(model, self.routing_table, self.tgt_dict, dict_path)
        return model

    def _check_or_set_routes(self, args):
        """Put the routing table in the model args (hence the checkpoint); refuse a model routed otherwise."""
        model_signature.check_model_args_routes(args, self.routing_table, self.args.config_yaml)
        for key, value in self.routing_table.to_args().items():
            setattr(args, key, value)

    # ------------------------------------------------------------ generation
    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, **kwargs):
        prefix_size = getattr(args, "prefix_size", 0)
        if prefix_size:
            logger.warning(
                f"--prefix-size {prefix_size} ignored: speech_to_text_smoe forces the guiding prefix from the "
                f"manifest (or --force-task/--force-tgt-lang), not from the reference"
            )
        extra = dict(extra_gen_cls_kwargs or {})
        extra["symbols_to_strip_from_output"] = set(extra.get("symbols_to_strip_from_output") or ()) | set(
            self.guiding_token_ids
        )
        ctc_decode_weight = getattr(self.args, "ctc_decode_weight", 0.0)
        if ctc_decode_weight and not getattr(args, "score_reference", False):
            models = JointCtcAttentionEnsemble(models, self.tgt_dict, ctc_decode_weight,
                                               getattr(self.args, "ctc_prebeam", 30), self.guiding_token_ids,
                                               routing_table=self.routing_table)
        return FairseqTask.build_generator(self, models, args, seq_gen_cls=seq_gen_cls, extra_gen_cls_kwargs=extra,
                                           **kwargs)

    @staticmethod
    def _to_model_dtype(sample, model):
        """``sample`` with the floating tensors of its net_input in the dtype of the model's parameters.

        ``fairseq-generate --fp16`` halves the model but not the batches (fairseq's trainer converts them, the
        generate loop does not), so the first convolution would get float fbank and half weights. A shallow copy: the
        caller's batch is left as it was.
        """
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        net_input = sample["net_input"]
        if dtype is None or not any(torch.is_tensor(v) and v.is_floating_point() and v.dtype != dtype
                                    for v in net_input.values()):
            return sample
        net_input = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                     for k, v in net_input.items()}
        return dict(sample, net_input=net_input)

    # ------------------------------------------------------- fairseq-interactive
    def get_interactive_tokens_and_lengths(self, lines, encode_fn):
        """Audio paths read by the plugin's reader (fairseq's needs torchaudio.sox_effects, gone in 2.9)."""
        from ..hub import interactive

        return interactive.get_interactive_tokens_and_lengths(self, lines, encode_fn)

    def build_dataset_for_inference(self, src_tokens, src_lengths, **kwargs):
        """The plugin's dataset over the paths: bandwidth per file, guiding prefix from --force-task/--force-tgt-lang."""
        from ..hub import interactive

        return interactive.build_dataset_for_inference(self, src_tokens, src_lengths, **kwargs)

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        from ..hub import interactive  # fairseq-interactive's batches carry only src_tokens/src_lengths

        sample = interactive.restore_routes(self, sample)
        prefix = sample["decoder_prefix"].to(sample["net_input"]["src_tokens"].device)
        if isinstance(getattr(generator, "model", None), JointCtcAttentionEnsemble):
            generator.model.prefix_len = prefix.size(1)
        sample = self._to_model_dtype(sample, models[0])
        with torch.no_grad(), self.amp_context(models[0]), self._log_autocast_dtype_once(models[0], "decoding"):
            return generator.generate(models, sample, prefix_tokens=prefix, constraints=constraints)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """FairseqTask.train_step (with SpeechToTextTask's multitask weights), under :meth:`amp_context`.

        Like fairseq, autocast is entered only when the trainer built an AMPOptimizer (``--amp``), whose GradScaler
        then scales the loss; the autocast dtype comes from ``--amp-dtype`` instead of fairseq's fixed CUDA fp16.
        """
        for task_name, task_obj in self.multitask_tasks.items():
            criterion.set_multitask_loss_weight(task_name, task_obj.args.get_loss_weight(update_num))
            if task_name in model.multitask_decoders:
                model.multitask_decoders[task_name].train()
        model.train()
        model.set_num_updates(update_num)
        with torch.autograd.profiler.record_function("forward"):
            with self.amp_context(model, enabled=isinstance(optimizer, AMPOptimizer)), \
                    self._log_autocast_dtype_once(model, "training"):
                loss, sample_size, logging_output = criterion(model, sample)
        if ignore_grad:
            loss *= 0
        with torch.autograd.profiler.record_function("backward"):
            optimizer.backward(loss)
        # every rank must log the same keys (fairseq sums them as one flat buffer): fairseq's stand-in batches
        # (ignore_grad: shards padded to the number of processes, batches emptied by --skip-bad-samples) log 0
        logging_output["n_skipped"] = 0 if ignore_grad else sample.get("n_skipped", 0)
        return loss, sample_size, logging_output

    # ------------------------------------------------------------ validation
    def valid_step(self, sample, model, criterion):
        with self.amp_context(model):
            loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        logging_output["n_skipped"] = sample.get("n_skipped", 0)
        if not getattr(self.args, "no_eval_scores", False):
            logging_output.update(self._eval_scores(sample, model))
        return loss, sample_size, logging_output

    def _decode(self, tokens) -> str:
        if self._eval_bpe is None:
            self._eval_bpe = self.build_bpe(self.args) or False
        ignore = set(self.guiding_token_ids) | {self.tgt_dict.pad()}
        text = self.tgt_dict.string(tokens.int().cpu(), extra_symbols_to_ignore=ignore, unk_string="<unk>")
        return self._eval_bpe.decode(text) if self._eval_bpe else text

    def _eval_scores(self, sample, model):
        gen_args = Namespace(beam=1, max_len_a=0, max_len_b=self.args.eval_max_len_b, min_len=1)
        generator = self.build_generator([model], gen_args)
        hypos = self.inference_step(generator, [model], sample)
        # rows of ASR tasks are scored by WER, the others by BLEU: the collater's per-row mask says which are which
        asr = asr_rows_of(sample["net_input"], self.routing_table)
        texts = {True: ([], []), False: ([], [])}
        for i in range(len(hypos)):
            hyp = self._decode(hypos[i][0]["tokens"])
            ref = self._decode(utils.strip_pad(sample["target"][i], self.tgt_dict.pad()))
            texts[bool(asr[i])][0].append(hyp)
            texts[bool(asr[i])][1].append(ref)
        out = evaluation.empty_scores()  # every key on every batch: see evaluation.empty_scores
        if texts[True][0]:
            out.update(evaluation.wer_stats(*texts[True]))
        if texts[False][0]:
            out.update(evaluation.bleu_stats(*texts[False]))
        return out

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)

        def total(key):
            value = sum(log.get(key, 0) for log in logging_outputs)
            return value.cpu().item() if torch.is_tensor(value) else value

        def count(key):  # summed across processes, counts come back as floats: keep them integers
            return int(round(total(key)))

        skipped = count("n_skipped")
        if skipped:
            metrics.log_scalar_sum("n_skipped", skipped)
        words = count("_wer_words")
        if words > 0:
            metrics.log_scalar_sum("_wer_errors", count("_wer_errors"))
            metrics.log_scalar_sum("_wer_words", words)
            metrics.log_derived(
                "wer", lambda m: evaluation.wer_from_sums(m["_wer_errors"].sum, m["_wer_words"].sum)
            )
        ref_len = count("_bleu_ref_len")
        if ref_len > 0:  # ST rows were decoded: report BLEU, 0 included (empty hypotheses)
            totals = [total(f"_bleu_totals_{i}") for i in range(evaluation.BLEU_ORDER)]
            counts = [total(f"_bleu_counts_{i}") for i in range(evaluation.BLEU_ORDER)]
            # int64 arrays: what lands in the checkpoint's metrics must load under weights_only
            metrics.log_scalar_sum("_bleu_counts", evaluation.as_counts(counts))
            metrics.log_scalar_sum("_bleu_totals", evaluation.as_counts(totals))
            metrics.log_scalar_sum("_bleu_sys_len", count("_bleu_sys_len"))
            metrics.log_scalar_sum("_bleu_ref_len", ref_len)
            metrics.log_derived(
                "bleu",
                lambda m: evaluation.bleu_from_sums(
                    m["_bleu_counts"].sum, m["_bleu_totals"].sum, m["_bleu_sys_len"].sum, m["_bleu_ref_len"].sum
                ),
            )
