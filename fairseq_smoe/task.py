"""``speech_to_text_smoe``: fairseq's S2T task plus guiding-token prefixes, S-MoE routes and WER/BLEU validation.

What it adds to ``speech_to_text``:

* targets start with a guiding prefix (``<transcribe> <lang:en>`` / ``<translate> <lang:es>``) built from the
  manifest's ``task`` and ``tgt_lang``; criteria never score it, the generator forces it, and it is stripped from
  hypotheses;
* every batch carries encoder (bandwidth) and decoder (task) route ids in ``net_input``;
* ``--force-task`` / ``--force-tgt-lang`` decode a test set as another task (e.g. an ASR set as ST);
* ``--ctc-decode-weight`` decodes ASR rows with joint CTC/attention beam search (:mod:`.joint_ctc_decoding`);
* validation decodes greedily and logs ``wer`` (ASR rows) and ``bleu`` (ST rows), usable as
  ``--best-checkpoint-metric``.
"""

import logging
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

from fairseq import utils
from fairseq.logging import metrics
from fairseq.tasks import FairseqTask, register_task
from fairseq.tasks.speech_to_text import SpeechToTextTask

from . import evaluation, model_signature
from .config import ConfigError, SMoEDataConfig
from .dataset import SMoEDatasetCreator
from .joint_ctc_decoding import JointCtcAttentionEnsemble
from .routing import TASK_TO_GUIDING_TOKEN, RoutingTable, guiding_token

logger = logging.getLogger(__name__)


class RoutingMismatchError(ValueError):
    pass


@register_task("speech_to_text_smoe")
class SpeechToTextSMoETask(SpeechToTextTask):
    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        parser.add_argument("--force-task", choices=sorted(TASK_TO_GUIDING_TOKEN), default=None,
                            help="decode every row as this task, whatever the manifest says (sets the guiding "
                                 "token and the decoder route)")
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

    def __init__(self, args, tgt_dict):
        super().__init__(args, tgt_dict)
        config_path = Path(args.data) / args.config_yaml
        self.smoe_cfg = SMoEDataConfig.from_dict(self.data_cfg.config.get("smoe"), where=str(config_path))
        self.routing_table: RoutingTable = self.smoe_cfg.routing_table
        missing = [guiding_token(t) for t in self.routing_table.task_tokens() if tgt_dict.index(guiding_token(t)) == tgt_dict.unk()]
        if missing:
            raise ConfigError(
                f"{Path(args.data) / self.data_cfg.vocab_filename}: guiding token(s) {missing} missing from the "
                f"dictionary; build it with `python -m fairseq_smoe.vocab` (or add them as SentencePiece "
                f"user-defined symbols)"
            )
        self.guiding_token_ids = {
            i for s, i in tgt_dict.indices.items()
            if s.startswith("<lang:") or s in {guiding_token(t) for t in TASK_TO_GUIDING_TOKEN.values()}
        }
        self._eval_bpe = None
        logger.info(f"S-MoE routing: {self.routing_table}; batches homogeneous: {self.smoe_cfg.homogeneous_batches}")

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
        return super().get_batch_iterator(
            dataset, *args, num_workers=num_workers, data_buffer_size=data_buffer_size, **kwargs
        )

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
        table = self.routing_table.to_args()
        for side, uses_experts in (("encoder", "encoder_smoe"), ("decoder", "decoder_smoe")):
            key = f"{side}_routes"
            have = getattr(args, key, None)
            if have and have != table[key] and getattr(args, uses_experts, False):
                raise RoutingMismatchError(
                    f"the model's {side} experts are routed as [{have}] but {self.args.config_yaml} (smoe."
                    f"{key}) says [{table[key]}]: expert i would receive another route's data. Use the routing "
                    f"table the model was trained with."
                )
            setattr(args, key, table[key])

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
                                               getattr(self.args, "ctc_prebeam", 30), self.guiding_token_ids)
        return FairseqTask.build_generator(self, models, args, seq_gen_cls=seq_gen_cls, extra_gen_cls_kwargs=extra,
                                           **kwargs)

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        prefix = sample["decoder_prefix"].to(sample["net_input"]["src_tokens"].device)
        if isinstance(getattr(generator, "model", None), JointCtcAttentionEnsemble):
            generator.model.prefix_len = prefix.size(1)
        with torch.no_grad():
            return generator.generate(models, sample, prefix_tokens=prefix, constraints=constraints)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        loss, sample_size, logging_output = super().train_step(
            sample, model, criterion, optimizer, update_num, ignore_grad
        )
        if not ignore_grad:  # fairseq's stand-in batches (ignore_grad) must not count
            logging_output["n_skipped"] = sample.get("n_skipped", 0)
        return loss, sample_size, logging_output

    # ------------------------------------------------------------ validation
    def valid_step(self, sample, model, criterion):
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
        by_task = {}
        for i, task in enumerate(sample["tasks"]):
            hyp = self._decode(hypos[i][0]["tokens"])
            ref = self._decode(utils.strip_pad(sample["target"][i], self.tgt_dict.pad()))
            by_task.setdefault(task, ([], []))
            by_task[task][0].append(hyp)
            by_task[task][1].append(ref)
        out = {}
        if "asr" in by_task:
            out.update(evaluation.wer_stats(*by_task["asr"]))
        if "st" in by_task:
            out.update(evaluation.bleu_stats(*by_task["st"]))
        return out

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)

        def total(key):
            value = sum(log.get(key, 0) for log in logging_outputs)
            return value.cpu().item() if torch.is_tensor(value) else value

        skipped = total("n_skipped")
        if skipped:
            metrics.log_scalar_sum("n_skipped", skipped)
        words = total("_wer_words")
        if words > 0:
            metrics.log_scalar_sum("_wer_errors", total("_wer_errors"))
            metrics.log_scalar_sum("_wer_words", words)
            metrics.log_derived(
                "wer", lambda m: evaluation.wer_from_sums(m["_wer_errors"].sum, m["_wer_words"].sum)
            )
        ref_len = total("_bleu_ref_len")
        if ref_len > 0:  # ST rows were decoded: report BLEU, 0 included (empty hypotheses)
            totals = [total(f"_bleu_totals_{i}") for i in range(evaluation.BLEU_ORDER)]
            counts = [total(f"_bleu_counts_{i}") for i in range(evaluation.BLEU_ORDER)]
            metrics.log_scalar_sum("_bleu_counts", np.array(counts))
            metrics.log_scalar_sum("_bleu_totals", np.array(totals))
            metrics.log_scalar_sum("_bleu_sys_len", total("_bleu_sys_len"))
            metrics.log_scalar_sum("_bleu_ref_len", ref_len)
            metrics.log_derived(
                "bleu",
                lambda m: evaluation.bleu_from_sums(
                    m["_bleu_counts"].sum, m["_bleu_totals"].sum, m["_bleu_sys_len"].sum, m["_bleu_ref_len"].sum
                ),
            )
