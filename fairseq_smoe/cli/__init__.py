"""Command-line tools (``python -m fairseq_smoe.cli.<name>``): params, validate, export."""
