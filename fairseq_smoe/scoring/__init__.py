"""Scores: WER/CER and BLEU statistics logged in validation and summed across processes."""
