"""WER and BLEU statistics for validation during training, summed across batches and workers.

Hypotheses and references are detokenized strings with the guiding tokens already removed. WER uses
lower-cased, punctuation-free words (as fairseq's ``--scoring wer --wer-lowercase --wer-remove-punct``); BLEU is
sacreBLEU's corpus BLEU with its default 13a tokenizer, accumulated from per-batch n-gram counts.
"""

import unicodedata
from typing import Dict, List, Sequence

import editdistance
import numpy as np

BLEU_ORDER = 4

WER_KEYS = ("_wer_errors", "_wer_words")
BLEU_KEYS = ("_bleu_sys_len", "_bleu_ref_len") + tuple(
    f"_bleu_{kind}_{i}" for i in range(BLEU_ORDER) for kind in ("counts", "totals")
)


def empty_scores() -> Dict[str, int]:
    """Every WER and BLEU key, at 0, in one fixed order: what a validation batch logs before its own counts.

    fairseq sums logging outputs across processes as ONE flat buffer built from the keys of each rank's first
    logging output (``Trainer._fast_stat_sync_sum``, also for its zeroed stand-in batches). With homogeneous batches
    two ranks decode different tasks, so a batch must log the keys of a task it does not hold too (as zeros), or the
    buffers differ in length and the collective aborts (gloo: ``op.preamble.length <= op.nbytes``) or hangs (NCCL).
    """
    return dict.fromkeys(WER_KEYS + BLEU_KEYS, 0)


def normalize_for_wer(text: str) -> List[str]:
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return text.split()


def wer_stats(hyps: Sequence[str], refs: Sequence[str]) -> Dict[str, int]:
    errors = words = 0
    for h, r in zip(hyps, refs):
        r_words = normalize_for_wer(r)
        errors += editdistance.eval(normalize_for_wer(h), r_words)
        words += len(r_words)
    return {"_wer_errors": errors, "_wer_words": words}


def cer_stats(hyps: Sequence[str], refs: Sequence[str]) -> Dict[str, int]:
    """Character errors over the WER-normalised words joined by single spaces (spaces count as characters)."""
    errors = chars = 0
    for h, r in zip(hyps, refs):
        r_text = " ".join(normalize_for_wer(r))
        errors += editdistance.eval(" ".join(normalize_for_wer(h)), r_text)
        chars += len(r_text)
    return {"_cer_errors": errors, "_cer_chars": chars}


def bleu_stats(hyps: Sequence[str], refs: Sequence[str]) -> Dict[str, int]:
    import sacrebleu

    b = sacrebleu.corpus_bleu(list(hyps), [list(refs)])
    out = {"_bleu_sys_len": b.sys_len, "_bleu_ref_len": b.ref_len}
    for i in range(BLEU_ORDER):
        out[f"_bleu_counts_{i}"] = b.counts[i]
        out[f"_bleu_totals_{i}"] = b.totals[i]
    return out


def wer_from_sums(errors: float, words: float) -> float:
    return round(100.0 * errors / words, 2) if words > 0 else float("nan")


def bleu_from_sums(counts: Sequence[float], totals: Sequence[float], sys_len: float, ref_len: float) -> float:
    from sacrebleu.metrics import BLEU

    b = BLEU.compute_bleu(
        correct=[int(c) for c in counts], total=[int(t) for t in totals],
        sys_len=int(sys_len), ref_len=int(ref_len), smooth_method="exp",
    )
    return round(b.score, 2)


def as_counts(values) -> np.ndarray:
    """Summed counts as an int64 array, whatever type they arrive in.

    Summed across processes they come back from fairseq's all-reduce as float64 tensors/floats. Logged as float64
    numpy arrays they would land in the checkpoint's metrics as ``numpy.dtypes.Float64DType``; counts are integers,
    and int64 is the dtype that checkpoints of a single process have always held.
    """
    return np.array([int(round(float(v))) for v in values], dtype=np.int64)
