"""A stand-in for a task when only a model is built: counting parameters, exporting weights, timing a model.

fairseq's ``build_model(args, task)`` asks a task for two things only: ``target_dictionary`` (its size sets the
embedding and output projection) and ``speaker_to_id``. Building a real ``speech_to_text_smoe`` task needs a data
directory, so the commands that have none (``cli.params``, ``cli.export``, ``benchmarks/speed.py``) build this.
"""

from typing import Sequence

from fairseq.data import Dictionary


class DictionaryOnlyTask:
    """``target_dictionary`` of ``vocab_size`` entries (fairseq's 4 specials, then ``symbols`` such as guiding
    tokens, then placeholder words), no speakers."""

    def __init__(self, vocab_size: int, symbols: Sequence[str] = ()):
        d = Dictionary()  # 4 specials
        for sym in symbols:
            d.add_symbol(sym)
        if vocab_size < len(d):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(d)} special and given symbols")
        for i in range(vocab_size - len(d)):
            d.add_symbol(f"w{i}")
        self.target_dictionary = d
        self.tgt_dict = d
        self.speaker_to_id = None
