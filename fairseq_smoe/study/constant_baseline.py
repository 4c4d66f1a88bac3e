"""The best *constant* hypothesis of a test set: what a model scores if it ignores the audio.

A model that does not listen gives every utterance of a test set the same output (the decoder sees the same guiding
tokens and nothing else that differs). The strongest such output, picked with the test references themselves, is a
better floor than the empty hypothesis on formulaic sets such as package descriptions ("this package contains the
...": a model that learned only the text prior already scores well there). Candidates are the training targets of
the same target language and every word prefix of them.

    python -m fairseq_smoe.study.constant_baseline --data data/offline_quick test_synth_asr_nb test_synth_es_st_nb
"""

import argparse
import json
from pathlib import Path
from typing import Dict, List, Sequence

import editdistance
import sacrebleu

from ..data.dataset import read_manifest
from ..routing import is_asr_task

BLEU_SHORTLIST = 50  # ST: exact BLEU on the candidates closest to the references by word edit distance


def candidates(train_targets: Sequence[str]) -> List[List[str]]:
    """Every distinct training target and every word prefix of one, as word lists."""
    out = set()
    for t in set(train_targets):
        words = tuple(t.split())
        out.update(words[:k] for k in range(1, len(words) + 1))
    return [list(c) for c in sorted(out)]


def best_constant(train_targets: Sequence[str], refs: Sequence[str], metric: str) -> Dict:
    """The candidate with the best corpus WER, CER (``metric="WER"``, ``"CER"``) or BLEU on ``refs``, and its
    score."""
    ref_words = [r.split() for r in refs]
    if not any(ref_words):
        raise ValueError("the references have no words")
    cands = candidates(train_targets)
    if not cands:
        raise ValueError("no training targets to draw a constant hypothesis from")
    # CER: characters, spaces included, of the space-joined words; WER (and the BLEU shortlist): words
    units = (lambda words: " ".join(words)) if metric == "CER" else (lambda words: words)
    ref_units = [units(r) for r in ref_words]
    errors = [sum(editdistance.eval(units(c), r) for r in ref_units) for c in cands]
    if metric in ("WER", "CER"):
        i = min(range(len(cands)), key=lambda k: (errors[k], cands[k]))
        total = sum(len(r) for r in ref_units)
        return {"hypothesis": " ".join(cands[i]), "score": round(100.0 * errors[i] / total, 2)}
    shortlist = sorted(range(len(cands)), key=lambda k: (errors[k], cands[k]))[:BLEU_SHORTLIST]
    scored = [(sacrebleu.corpus_bleu([" ".join(cands[k])] * len(refs), [list(refs)]).score, k) for k in shortlist]
    score, i = max(scored, key=lambda x: (x[0], -x[1]))
    return {"hypothesis": " ".join(cands[i]), "score": round(score, 2)}


def for_test_set(data: Path, subset: str, train_rows: List[Dict[str, str]]) -> Dict:
    """WER (and CER) for an ASR test set, BLEU for an ST one."""
    rows = read_manifest(str(data / f"{subset}.tsv"))
    lang = rows[0]["tgt_lang"]
    metric = "WER" if is_asr_task(rows[0]["task"]) else "BLEU"
    targets = [r["tgt_text"] for r in train_rows if r["tgt_lang"] == lang]
    if not targets:
        raise ValueError(f"{data / 'train.tsv'}: no training targets in language {lang!r} (for {subset})")
    refs = [r["tgt_text"] for r in rows]
    out = {"metric": metric, **best_constant(targets, refs, metric)}
    if metric == "WER":
        cer = best_constant(targets, refs, "CER")
        out.update(cer=cer["score"], cer_hypothesis=cer["hypothesis"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("subsets", nargs="+")
    args = p.parse_args(argv)
    train = read_manifest(str(args.data / "train.tsv"))
    print(json.dumps({s: for_test_set(args.data, s, train) for s in args.subsets}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
