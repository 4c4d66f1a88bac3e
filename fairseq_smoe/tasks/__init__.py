"""fairseq tasks: ``speech_to_text_smoe`` (guiding prefix, route checks, validation WER/BLEU, generation)."""

from . import speech_to_text_smoe  # noqa: F401
