"""fairseq-train command lines shared by the tests that run fairseq's CLIs (several processes, precisions)."""

import sys
from pathlib import Path

PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_smoe"
BIN = Path(sys.executable).parent


def validated_train_cmd(data, save_dir, *extra, train_subset="train", seed=3):
    """fairseq-train as users run it: a 2+1-layer encdec S-MoE, validation on with WER choosing the best
    checkpoint, CE + CTC on the ASR rows. ``extra`` adds flags (updates, precision, distributed launch)."""
    return [
        str(BIN / "fairseq-train"), str(data), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--arch", "s2t_encdec_smoe_xs", "--encoder-layers", "2",
        "--decoder-layers", "1", "--train-subset", train_subset, "--valid-subset", "dev",
        "--criterion", "label_smoothed_cross_entropy_asr_ctc", "--ctc-weight", "0.3", "--optimizer", "adam",
        "--lr", "2e-3", "--max-sentences", "8", "--seed", str(seed), "--save-dir", str(save_dir),
        "--best-checkpoint-metric", "wer", "--eval-max-len-b", "10", "--cpu", "--num-workers", "0",
        "--log-format", "simple", "--log-interval", "1", *extra,
    ]
