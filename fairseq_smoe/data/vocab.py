"""SentencePiece vocabulary whose fairseq dictionary holds the S-MoE guiding tokens.

The guiding tokens (``<transcribe>``, ``<translate>``, ``<lang:xx>``) are SentencePiece user-defined symbols, so
they are single pieces that text never splits into, and they are written into the fairseq dictionary that
``config.yaml``'s ``vocab_filename`` names. Recipes call :func:`build_vocab`; the task checks at start-up that the
tokens are there.
"""

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Iterable, List, Sequence

from ..routing import DEFAULT_DECODER_ROUTES, guiding_token, lang_tag, parse_route_list, route_token

logger = logging.getLogger(__name__)

# fairseq's Dictionary reserves these four; SentencePiece must use the same ids.
SPM_SPECIALS = dict(unk_id=3, bos_id=0, eos_id=2, pad_id=1)


def guiding_tokens(langs: Iterable[str], task_tokens: Sequence[str] = DEFAULT_DECODER_ROUTES) -> List[str]:
    """The dictionary symbols of the decoder routes' guiding tokens (``translate:de`` -> ``<translate>``) and of
    one ``<lang:xx>`` per target language."""
    tokens = [guiding_token(route_token(t)) for t in task_tokens]
    tokens += [lang_tag(lang) for lang in sorted(set(langs))]
    return list(dict.fromkeys(tokens))


def build_vocab(
    texts: Iterable[str],
    out_dir: str,
    langs: Iterable[str],
    vocab_size: int = 1000,
    model_type: str = "unigram",
    prefix: str = "spm",
    task_tokens: Sequence[str] = DEFAULT_DECODER_ROUTES,
    byte_fallback: bool = False,
) -> dict:
    """Train ``{prefix}.model`` on ``texts`` and write the fairseq dictionary ``{prefix}.txt`` beside it.

    ``model_type="bpe"`` with ``byte_fallback=True`` gives a byte-level BPE like the paper's BBPE.
    Returns the ``bpe_tokenizer`` / ``vocab_filename`` entries for ``config.yaml``. Atomic: the files appear only
    once complete.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    symbols = guiding_tokens(langs, task_tokens)
    tmp_text = out / f".{prefix}.train.txt.tmp"
    n = 0
    with open(tmp_text, "w", encoding="utf-8") as f:
        for t in texts:
            t = t.strip()
            if t:
                f.write(t + "\n")
                n += 1
    if n == 0:
        raise ValueError("build_vocab: no training text")
    tmp_prefix = out / f".{prefix}.tmp"
    spm.SentencePieceTrainer.Train(
        input=str(tmp_text),
        model_prefix=str(tmp_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        user_defined_symbols=",".join(symbols),
        byte_fallback=byte_fallback,
        num_threads=max(1, os.cpu_count() or 1),
        minloglevel=2,
        hard_vocab_limit=False,
        **SPM_SPECIALS,
    )
    # fairseq dictionary: every piece except the four specials fairseq adds itself
    vocab_lines = []
    with open(f"{tmp_prefix}.vocab", encoding="utf-8") as f:
        for line in f:
            piece = line.split("\t")[0]
            if piece in ("<unk>", "<s>", "</s>", "<pad>"):
                continue
            vocab_lines.append(f"{piece} 1\n")
    tmp_dict = out / f".{prefix}.txt.tmp"
    with open(tmp_dict, "w", encoding="utf-8") as f:
        f.writelines(vocab_lines)
    os.replace(f"{tmp_prefix}.model", out / f"{prefix}.model")
    os.replace(tmp_dict, out / f"{prefix}.txt")
    for leftover in (f"{tmp_prefix}.vocab", tmp_text):
        Path(leftover).unlink(missing_ok=True)
    logger.info(f"vocabulary: {len(vocab_lines) + 4} entries ({len(symbols)} guiding tokens) in {out}")
    return {
        "bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": f"{prefix}.model"},
        "vocab_filename": f"{prefix}.txt",
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", required=True, nargs="+", help="text files, one sentence a line")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--langs", required=True, help="comma-separated target languages, e.g. en,es")
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "char", "word"])
    p.add_argument("--byte-fallback", action="store_true", help="byte-level fallback (BBPE-like with --model-type bpe)")
    p.add_argument("--prefix", default="spm")
    p.add_argument("--decoder-routes", default=",".join(DEFAULT_DECODER_ROUTES),
                   help="config.yaml's smoe.decoder_routes: each route's guiding token becomes a symbol (e.g. "
                        "transcribe,translate,summarize adds <summarize>)")
    a = p.parse_args(argv)

    def lines():
        for path in a.text:
            with open(path, encoding="utf-8") as f:
                yield from f

    cfg = build_vocab(lines(), a.out_dir, a.langs.split(","), a.vocab_size, a.model_type, a.prefix,
                      task_tokens=parse_route_list(a.decoder_routes, "--decoder-routes"), byte_fallback=a.byte_fallback)
    print(json.dumps(cfg))


if __name__ == "__main__":
    main()
