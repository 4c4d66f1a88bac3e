"""Check manifests before training and list every problem in one pass.

    python -m fairseq_smoe.cli.validate DATA/train.tsv DATA/dev.tsv [--config DATA/config.yaml] [--check-audio]

Checks the header, ids (duplicates), n_frames, empty targets, task, target language and its ``<lang:xx>`` tag in
the dictionary, bandwidth and its encoder route, and that every audio file exists. ``--check-audio`` also decodes
every file (unreadable or truncated files, stereo, unsupported sample rate, clips shorter than one 25 ms window,
NaN/inf in ``.npy`` features). Exit status 0 when clean, 1 when problems were found, 2 for unusable arguments.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from ..data.config import ConfigError, SMoEDataConfig
from ..data.manifest import ManifestError, RowChecker, manifest_base, read_manifest


def load_config(path: Path):
    import yaml
    from fairseq.data import Dictionary

    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    smoe_cfg = SMoEDataConfig.from_dict(raw.get("smoe"), where=str(path))
    vocab = raw.get("vocab_filename")
    tgt_dict = Dictionary.load(str(path.parent / vocab)) if vocab else None
    return smoe_cfg, tgt_dict, raw.get("audio_root") or None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("manifests", nargs="+", type=Path)
    p.add_argument("--config", type=Path, help="config.yaml (default: the one beside the first manifest, if any)")
    p.add_argument("--check-audio", action="store_true", help="decode every audio/feature file")
    p.add_argument("--max-report", type=int, default=1000, help="stop listing after this many problems")
    a = p.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)

    config = a.config or a.manifests[0].parent / "config.yaml"
    try:
        if config.is_file():
            smoe_cfg, tgt_dict, audio_root = load_config(config)
        elif a.config:
            print(f"error: {config}: no such file", file=sys.stderr)
            return 2
        else:
            smoe_cfg, tgt_dict, audio_root = SMoEDataConfig(), None, None
            print(f"note: no {config}; default routes, dictionary not checked", file=sys.stderr)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    checker = RowChecker(smoe_cfg, tgt_dict)
    n_rows = n_bad = n_problems = 0
    for manifest in a.manifests:
        try:
            rows = read_manifest(str(manifest))
        except ManifestError as e:
            print(e)
            n_problems += 1
            continue
        base = manifest_base(str(manifest.parent), audio_root, str(manifest))
        for line, row in enumerate(rows, start=2):
            where = f"{manifest}:{line} (id {row['id']!r})"
            _, problems = checker.check(row, where, base, check_audio=a.check_audio)
            n_rows += 1
            if problems:
                n_bad += 1
                for problem in problems:
                    n_problems += 1
                    if n_problems <= a.max_report:
                        print(f"{where}: {problem}")
    summary = f"{n_rows} rows in {len(a.manifests)} manifest(s): {n_bad} bad rows, {n_problems} problems"
    print(summary, file=sys.stderr)
    return 1 if n_problems else 0


if __name__ == "__main__":
    sys.exit(main())
