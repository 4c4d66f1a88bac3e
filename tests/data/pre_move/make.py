"""Build tests/data/pre_move/: tiny checkpoints written by the plugin as it was before the redesign (commit a678e64),
with the data they decode and the hypotheses they gave, so a test can show the moved code loads and decodes them
identically. Run from the repository root at that commit:  PYTHONPATH=tests python tests/data/pre_move/make.py OUT_DIR
"""
import csv, json, os, re, shutil, subprocess, sys
from pathlib import Path

from fixture_corpus import make_corpus  # tests/ on PYTHONPATH

out = Path(sys.argv[1]).resolve()
work = Path("/tmp/premove/work")
shutil.rmtree(work, ignore_errors=True)
corpus = make_corpus(work / "corpus", n_train_sentences=16, n_dev_sentences=2, n_test_sentences=2, vocab_size=120)
root = corpus["root"]
BIN = Path(sys.executable).parent
PLUGIN = Path("fairseq_smoe").resolve()
TINY = ["--encoder-layers", "2", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2", "--conv-channels", "32"]
env = dict(os.environ, OMP_NUM_THREADS="1")

# the test data: the 2 test sentences of each test set (ASR/ST x NB/WB), one manifest
out.mkdir(parents=True, exist_ok=True)
rows = []
for name in ("test_asr_nb", "test_asr_wb", "test_st_nb", "test_st_wb"):
    with open(root / f"{name}.tsv", encoding="utf-8") as f:
        rows += list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
for r in rows:
    dst = out / r["audio"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / r["audio"], dst)
with open(out / "test.tsv", "w", encoding="utf-8", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
for name in ("config.yaml", corpus["vocab"]["model"].name, corpus["vocab"]["dict"].name):
    shutil.copyfile(root / name, out / name)

expected = {}
for arch, extra in (("s2t_encdec_smoe_xs", []), ("s2t_encdec_lmoe_xs", ["--moe-aux-weight", "0.01"])):
    save = work / arch
    crit = ["--criterion", "label_smoothed_cross_entropy_moe"] if "lmoe" in arch else ["--criterion", "label_smoothed_cross_entropy"]
    subprocess.run([str(BIN / "fairseq-train"), str(root), "--user-dir", str(PLUGIN), "--config-yaml", "config.yaml",
                    "--task", "speech_to_text_smoe", "--arch", arch, *TINY, *crit, "--label-smoothing", "0.1",
                    "--train-subset", "train", "--valid-subset", "dev", "--optimizer", "adam", "--lr", "3e-3",
                    "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5", "--max-sentences", "16",
                    "--max-update", "80", "--seed", "1", "--save-dir", str(save), "--cpu", "--num-workers", "0",
                    "--no-epoch-checkpoints", "--no-save-optimizer-state", "--disable-validation"],
                   check=True, env=env)
    ckpt = out / f"{arch}.pt"
    shutil.copyfile(save / "checkpoint_last.pt", ckpt)
    gen = subprocess.run([str(BIN / "fairseq-generate"), str(out), "--user-dir", str(PLUGIN), "--config-yaml",
                          "config.yaml", "--task", "speech_to_text_smoe", "--gen-subset", "test", "--path", str(ckpt),
                          "--max-tokens", "20000", "--beam", "3", "--max-len-b", "20", "--cpu", "--scoring", "wer"],
                         check=True, env=env, capture_output=True, text=True)
    hyps = {}
    for m in re.finditer(r"^H-(\d+)\t(\S+)\t(.*)$", gen.stdout, re.M):
        hyps[m.group(1)] = {"score": float(m.group(2)), "tokens": m.group(3)}
    for m in re.finditer(r"^P-(\d+)\t(.*)$", gen.stdout, re.M):
        hyps[m.group(1)]["positional_scores"] = [float(x) for x in m.group(2).split()]
    for m in re.finditer(r"^D-(\d+)\t\S+\t(.*)$", gen.stdout, re.M):
        hyps[m.group(1)]["text"] = m.group(2)
    assert len(hyps) == len(rows), gen.stdout[-2000:] + gen.stderr[-2000:]
    expected[arch] = hyps
with open(out / "expected.json", "w", encoding="utf-8") as f:
    json.dump({"commit": subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip(),
               "generate": "--beam 3 --max-len-b 20 --max-tokens 20000 --cpu", "hypotheses": expected}, f, indent=1,
              ensure_ascii=False)
print("wrote", out)
