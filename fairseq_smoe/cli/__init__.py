"""Command-line tools, ``python -m fairseq_smoe.cli.<name>``: transcribe, average_checkpoints, upcycle, params, validate,
export, trust_checkpoint."""
