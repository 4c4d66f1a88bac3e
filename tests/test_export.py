"""Dense export: one route pair of an S-MoE checkpoint as a stock fairseq s2t_transformer checkpoint that stock
fairseq-generate (no --user-dir) decodes with the same hypotheses and scores as the plugin."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fairseq import checkpoint_utils

from fairseq_smoe.cli import export

PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_smoe"
BIN = Path(sys.executable).parent


def run(cmd, cwd, check=True):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{log[-6000:]}"
    return proc, log


@pytest.fixture(scope="module")
def smoe_checkpoint(corpus_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("export")
    run([
        BIN / "fairseq-train", corpus_dir, "--user-dir", PLUGIN, "--config-yaml", "config.yaml",
        "--task", "speech_to_text_smoe", "--arch", "s2t_encdec_smoe_xs", "--train-subset", "train",
        "--valid-subset", "dev", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5",
        "--max-sentences", "8", "--max-update", "12", "--seed", "1", "--save-dir", work / "ckpt", "--cpu",
        "--num-workers", "0", "--no-epoch-checkpoints", "--no-eval-scores", "--disable-validation",
    ], cwd=work)
    return work, work / "ckpt" / "checkpoint_last.pt"


def decoded(log):
    """id -> (score, detokenized hypothesis) from fairseq-generate's D- lines, plus the positional scores."""
    hyps = {int(m[1]): (m[2], m[3]) for m in re.finditer(r"^D-(\d+)\t(\S+)\t(.*)$", log, re.M)}
    pos = {int(m[1]): m[2] for m in re.finditer(r"^P-(\d+)\t(.*)$", log, re.M)}
    return hyps, pos


GEN = ["--max-tokens", "20000", "--beam", "3", "--max-len-b", "20", "--cpu", "--scoring"]


@pytest.mark.parametrize("enc,dec,subset,scoring", [("wb", "transcribe", "test_asr_wb", "wer"),
                                                    ("nb", "translate", "test_st_nb", "sacrebleu")])
def test_stock_fairseq_generate_on_the_export_gives_the_plugins_hypotheses(smoe_checkpoint, corpus_dir, enc, dec,
                                                                           subset, scoring):
    work, ckpt = smoe_checkpoint
    out, data = work / f"dense_{enc}_{dec}.pt", work / f"data_{enc}_{dec}"
    _, log = run([sys.executable, "-m", "fairseq_smoe.cli.export", "--checkpoint", ckpt, "--encoder-route", enc,
                  "--decoder-route", dec, "--out", out, "--data", corpus_dir, "--subsets", subset,
                  "--out-data", data], cwd=work)
    assert f"wrote {out}: s2t_transformer" in log and f"{subset} (8 rows)" in log

    _, plugin = run([BIN / "fairseq-generate", corpus_dir, "--user-dir", PLUGIN, "--config-yaml", "config.yaml",
                     "--task", "speech_to_text_smoe", "--gen-subset", subset, "--path", ckpt, *GEN, scoring],
                    cwd=work)
    # stock fairseq: no --user-dir, stock task, the exported checkpoint and data
    _, stock = run([BIN / "fairseq-generate", data, "--config-yaml", "config.yaml", "--task", "speech_to_text",
                    "--gen-subset", subset, "--path", out, "--prefix-size", "2", "--post-process", "sentencepiece",
                    *GEN, scoring], cwd=work)
    assert "SMoE" not in stock and "fairseq_smoe" not in stock  # nothing of the plugin was loaded
    (plugin_hyps, plugin_pos), (stock_hyps, stock_pos) = decoded(plugin), decoded(stock)
    assert len(plugin_hyps) == 8
    assert stock_hyps == plugin_hyps  # same text, same scores
    assert stock_pos == plugin_pos
    assert not any(re.search(r"<(transcribe|translate|lang:)", h) for _, h in stock_hyps.values())
    score = re.compile(r"Generate \S+ with beam=3: (WER: [\d.]+|BLEU = [\d.]+)")
    assert score.search(stock).group(1) == score.search(plugin).group(1)


def test_exported_weights_are_the_chosen_experts(smoe_checkpoint):
    work, ckpt = smoe_checkpoint
    src = checkpoint_utils.load_checkpoint_to_cpu(str(ckpt))["model"]
    outs = {}
    for enc, dec in (("wb", "transcribe"), ("nb", "translate")):
        outs[enc] = work / f"w_{enc}.pt"
        info = export.export_checkpoint(str(ckpt), enc, dec, str(outs[enc]))
        assert info["arch"] == "s2t_transformer" and info["parameters"] > 0
    # loadable with torch's default weights_only unpickler and nothing registered: only plain types inside
    wb = torch.load(outs["wb"], weights_only=True)
    nb = torch.load(outs["nb"], weights_only=True)
    assert wb["cfg"]["model"]["arch"] == "s2t_transformer" and wb["cfg"]["task"]["_name"] == "speech_to_text"
    assert "encoder_smoe" not in wb["cfg"]["model"] and export.SIGNATURE_KEY not in wb["model"]
    key = "encoder.transformer_layers.2.fc1.weight"
    assert src[key].shape[0] == 2 and wb["model"][key].shape == src[key].shape[1:]
    assert torch.equal(wb["model"][key], src[key][0]) and torch.equal(nb["model"][key], src[key][1])
    dkey = "decoder.layers.1.fc2.bias"
    assert torch.equal(wb["model"][dkey], src[dkey][0]) and torch.equal(nb["model"][dkey], src[dkey][1])
    shared = "encoder.transformer_layers.2.self_attn.k_proj.weight"
    assert torch.equal(wb["model"][shared], src[shared]) and torch.equal(nb["model"][shared], src[shared])


def test_unknown_or_missing_route_is_a_clear_error(smoe_checkpoint):
    work, ckpt = smoe_checkpoint
    proc, log = run([sys.executable, "-m", "fairseq_smoe.cli.export", "--checkpoint", ckpt, "--encoder-route", "sb",
                     "--decoder-route", "transcribe", "--out", work / "x.pt"], cwd=work, check=False)
    assert proc.returncode == 2
    assert "--encoder-route 'sb' is not one of the encoder routes ['wb', 'nb'] of the checkpoint" in proc.stderr
    assert not (work / "x.pt").exists()
    with pytest.raises(export.ExportError, match="decoder experts \\['transcribe', 'translate'\\]: choose one with "
                                                 "--decoder-route"):
        export.export_checkpoint(str(ckpt), "wb", None, str(work / "y.pt"))
    with pytest.raises(export.ExportError, match="--decoder-route 'summarize' is not one of"):
        export.export_checkpoint(str(ckpt), "wb", "summarize", str(work / "y.pt"))


def test_learned_gate_checkpoint_is_refused(smoe_checkpoint, tmp_path):
    _, ckpt = smoe_checkpoint
    state = checkpoint_utils.load_checkpoint_to_cpu(str(ckpt))
    state["cfg"]["model"].arch = "s2t_encdec_lmoe_xs"
    fake = tmp_path / "lmoe.pt"
    torch.save({**state, "cfg": OmegaConf.to_container(state["cfg"])}, fake)
    with pytest.raises(export.ExportError, match="'s2t_encdec_lmoe_xs' is not an S-MoE model"):
        export.export_checkpoint(str(fake), "wb", "transcribe", str(tmp_path / "z.pt"))
