"""Greedy CTC decoding of an ASR test set with a model's auxiliary CTC head: what the *encoder* alone hears.

The attention decoder of a small model trained for minutes learns the output language long before it learns to
condition on the audio; the CTC head (trained by ``label_smoothed_cross_entropy_asr_ctc``) has no such text prior,
so its character error rate shows whether the encoder has learned to listen at all.

    python -m fairseq_smoe.study.ctc_greedy --path exp/demo_quick/s2t_smoe_base/checkpoint_best.pt \\
        --data data/offline_quick --subset test_real_asr_nb [--out hyps.tsv] [--cpu]
"""

import argparse
import itertools
import json
from argparse import Namespace
from pathlib import Path

import torch

from fairseq import checkpoint_utils, utils

from ..decoding.joint_ctc import ctc_log_probs
from ..routing import ASR_TASK
from ..scoring.evaluation import cer_stats, wer_from_sums, wer_stats

PLUGIN = Path(__file__).resolve().parents[1]  # the fairseq_smoe package: --user-dir


def greedy_ids(log_probs: torch.Tensor, length: int, blank: int) -> list:
    """Best path of one utterance (T x V): repeats collapsed, then blanks removed."""
    best = log_probs[:length].argmax(dim=-1).tolist()
    return [k for k, _ in itertools.groupby(best) if k != blank]


def decode(path: str, data: str, subset: str, cpu: bool = True, max_tokens: int = 20000) -> dict:
    utils.import_user_module(Namespace(user_dir=str(PLUGIN)))
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [path], arg_overrides={"data": data, "config_yaml": "config.yaml"})
    model = models[0].eval()
    if getattr(model.encoder, "ctc_proj", None) is None:
        raise SystemExit(f"{path}: the model has no CTC head (trained with --ctc-weight 0); nothing to decode")
    use_cuda = torch.cuda.is_available() and not cpu
    if use_cuda:
        model.cuda()
    d = task.tgt_dict
    bpe = task.build_bpe(Namespace())  # the data config's SentencePiece model
    blank = d.bos()  # as label_smoothed_cross_entropy_asr_ctc trains it
    task.load_dataset(subset)
    dataset = task.dataset(subset)
    table = task.routing_table
    if not all(table.is_asr_task(t) for t in getattr(dataset, "tasks", [ASR_TASK])):
        raise SystemExit(f"{subset}: not an ASR test set (CTC is trained on transcripts only)")
    batches = task.get_batch_iterator(dataset, max_tokens=max_tokens, max_positions=(10 ** 6, 10 ** 6),
                                      ignore_invalid_inputs=False).next_epoch_itr(shuffle=False)
    guiding = table.guiding_token_ids(d)  # never in a transcript
    rows = []
    with torch.no_grad():
        for sample in batches:
            if use_cuda:
                sample = utils.move_to_cuda(sample)
            # the encoder alone (with the batch's routes): the decoder's output is not needed
            net_input = {k: v for k, v in sample["net_input"].items() if k != "prev_output_tokens"}
            lprobs, lengths = ctc_log_probs(model.encoder, model.encoder(**net_input))
            lprobs = lprobs.transpose(0, 1)  # B x T x V
            for b, index in enumerate(sample["id"].tolist()):
                ids = [i for i in greedy_ids(lprobs[b], int(lengths[b]), blank)
                       if i >= d.nspecial and i not in guiding]
                hyp = d.string(torch.tensor(ids, dtype=torch.long))
                hyp = bpe.decode(hyp) if bpe is not None else hyp
                rows.append((dataset.ids[index], dataset.tgt_texts[index], hyp))
    rows.sort()
    hyps, refs = [h for _, _, h in rows], [r for _, r, _ in rows]
    w, c = wer_stats(hyps, refs), cer_stats(hyps, refs)
    return {"n": len(rows), "wer": wer_from_sums(w["_wer_errors"], w["_wer_words"]),
            "cer": wer_from_sums(c["_cer_errors"], c["_cer_chars"]), "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--path", required=True, help="checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--subset", required=True, help="an ASR test manifest's name")
    p.add_argument("--out", type=Path, help="write id, reference and hypothesis per line (TSV)")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    result = decode(args.path, args.data, args.subset, cpu=args.cpu)
    if args.out:
        args.out.write_text("".join(f"{i}\t{r}\t{h}\n" for i, r, h in result["rows"]), encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
