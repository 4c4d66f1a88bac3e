"""Convert a trusted legacy checkpoint into one that loads under torch's ``weights_only`` allow-list.

    python -m fairseq_smoe.cli.trust_checkpoint --trust OLD.pt --out NEW.pt

A checkpoint holding pickled objects beyond what fairseq writes (e.g. an omegaconf ``DictConfig`` cfg of an old
fairseq) is refused by the plugin's loader, naming this command. ``--trust`` fully unpickles the file, so only name
one you made or trust; the output holds plain containers and loads anywhere the plugin does
(:func:`fairseq_smoe.checkpoint.safety.convert_trusted`).
"""

import argparse
import os
import sys

from ..checkpoint.safety import UnsafeCheckpointError, convert_trusted


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Convert a trusted legacy checkpoint into one that loads under torch's weights_only allow-list."
    )
    p.add_argument("--trust", required=True, metavar="CHECKPOINT",
                   help="the checkpoint to convert; it is fully unpickled, so only name a file you trust")
    p.add_argument("--out", required=True, help="where to write the converted checkpoint")
    a = p.parse_args(argv)
    if not os.path.isfile(a.trust):
        print(f"error: {a.trust}: no such file", file=sys.stderr)
        return 2
    try:
        convert_trusted(a.trust, a.out)
    except UnsafeCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{a.out}: converted from {a.trust}; it loads with weights_only=True")
    return 0


if __name__ == "__main__":
    sys.exit(main())
