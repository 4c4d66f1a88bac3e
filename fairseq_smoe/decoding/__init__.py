"""Decoding: joint CTC/attention beam search for fairseq-generate and its vectorised CTC prefix scorer."""
