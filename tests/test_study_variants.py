"""fairseq_smoe.study.variants: the label-robustness variants (issue 15, section 3) decode with plain fairseq-generate.

Data: tests/data/pre_move (8 rows: ASR/ST x NB/WB of 2 clips, NB stored at 8 kHz, WB at 16 kHz; a trained tiny
s2t_encdec_smoe_xs checkpoint and a learned-gate one). Checked: swapping labels twice gives the original bytes; a
bad label names its row; the spectral view detects every NB clip as nb and every WB clip as wb, gives the model the
original file's features and decodes (fairseq-generate, the console script) to the original hypotheses; a view dir
reads a copied manifest as the corpus does; the rerouted checkpoint holds the other route's experts and nothing
else changed, changes ASR logits and hypotheses, and rerouting twice restores it; models without decoder experts
are refused.
"""

import copy
import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

import fairseq_smoe  # noqa: F401  (registers the plugin, installs the checkpoint allow-list)
from fairseq import checkpoint_utils, options
from omegaconf import OmegaConf

from fairseq_smoe.checkpoint import signature
from fairseq_smoe.data import audio
from fairseq_smoe.routing import BANDWIDTHS, RoutingTable
from fairseq_smoe.study import variants
from fairseq_smoe.tasks.speech_to_text_smoe import SpeechToTextSMoETask

DATA = Path(__file__).resolve().parent / "data" / "pre_move"
CKPT = DATA / "s2t_encdec_smoe_xs.pt"
PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_smoe"
BIN = Path(sys.executable).parent
EXPERT = re.compile(r"^decoder\.layers\.\d+\.fc[12]\.(weight|bias)$")


def make_task(data: Path, subset: str, config_yaml: str = "config.yaml") -> SpeechToTextSMoETask:
    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(parser, [str(data), "--task", "speech_to_text_smoe", "--config-yaml",
                                                str(config_yaml), "--cpu"])
    task = SpeechToTextSMoETask.setup_task(args)
    task.load_dataset(subset)
    return task


def generate(data: Path, subset: str, ckpt: Path, cwd: Path, config_yaml: str = "config.yaml") -> dict:
    """The fairseq-generate console script: ``{row id: hypothesis}`` (and the return code checked)."""
    proc = subprocess.run(
        [str(BIN / "fairseq-generate"), str(data), "--user-dir", str(PLUGIN), "--config-yaml", str(config_yaml),
         "--task", "speech_to_text_smoe", "--gen-subset", subset, "--path", str(ckpt), "--max-tokens", "20000",
         "--beam", "3", "--max-len-b", "20", "--cpu"],
        cwd=cwd, capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": str(BIN) + ":/usr/bin:/bin"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ids = [r["id"] for r in rows_of(data / f"{subset}.tsv")]
    hyps = {ids[int(m.group(1))]: m.group(2) for m in re.finditer(r"^D-(\d+)\t[^\t]*\t(.*)$", proc.stdout, re.M)}
    assert len(hyps) == len(ids), proc.stdout[-2000:]
    return hyps


def rows_of(path: Path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("variants")


@pytest.fixture(scope="module")
def view(work) -> Path:
    view_dir = work / "testsets"
    variants.make_view(DATA, view_dir)
    return view_dir


@pytest.fixture(scope="module")
def original_hyps(work):
    return generate(DATA, "test", CKPT, work)


# ------------------------------------------------------------------------------------------ swapped labels
def test_swap_twice_gives_the_original_bytes(work):
    once, twice = work / "swap1.tsv", work / "swap2.tsv"
    assert variants.swap_bandwidth(DATA / "test.tsv", once) == 8
    a, b = BANDWIDTHS
    got = [r["bandwidth"] for r in rows_of(once)]
    want = [{a: b, b: a}[r["bandwidth"]] for r in rows_of(DATA / "test.tsv")]
    assert got == want and set(got) == {a, b}
    for r, o in zip(rows_of(once), rows_of(DATA / "test.tsv")):  # nothing else changed
        assert {k: v for k, v in r.items() if k != "bandwidth"} == {k: v for k, v in o.items() if k != "bandwidth"}
    assert variants.swap_bandwidth(once, twice) == 8
    assert twice.read_bytes() == (DATA / "test.tsv").read_bytes()


@pytest.mark.parametrize("label,word", [("", "empty"), ("sb", "unknown")])
def test_swap_names_the_bad_row(work, label, word):
    lines = (DATA / "test.tsv").read_text(encoding="utf-8").splitlines()
    fields = lines[3].split("\t")
    fields[-1] = label
    lines[3] = "\t".join(fields)
    bad = work / f"bad_{word}.tsv"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}:4 \(id '{fields[0]}'\): bandwidth .* {word}"):
        variants.swap_bandwidth(bad, work / "never.tsv")
    assert not (work / "never.tsv").exists()


def test_swapped_manifest_routes_every_row_to_the_other_expert(view):
    variants.swap_bandwidth(DATA / "test.tsv", view / "test_swapped.tsv")
    original = make_task(DATA, "test").datasets["test"]
    swapped = make_task(view, "test_swapped").datasets["test_swapped"]
    table = original.routing_table
    assert list(swapped.encoder_routes) == [1 - e for e in original.encoder_routes]  # two encoder routes
    assert [table.encoder_routes[e] for e in swapped.encoder_routes] == list(swapped.bandwidths)
    assert list(swapped.decoder_routes) == list(original.decoder_routes)


# --------------------------------------------------------------------------------------------- view dir
def test_view_dir_reads_a_copied_manifest_like_the_corpus(view):
    cfg = yaml.safe_load((view / "config.yaml").read_text())
    assert Path(cfg["vocab_filename"]).is_absolute() and Path(cfg["vocab_filename"]).is_file()
    assert Path(cfg["bpe_tokenizer"]["sentencepiece_model"]).is_file()
    assert Path(cfg["audio_root"]) == DATA.resolve()
    shutil.copyfile(DATA / "test.tsv", view / "test.tsv")
    corpus, copied = make_task(DATA, "test"), make_task(view, "test")
    assert copied.tgt_dict.symbols == corpus.tgt_dict.symbols
    a, b = corpus.datasets["test"], copied.datasets["test"]
    assert len(a) == len(b) == 8
    for i in range(len(a)):
        assert torch.equal(a[i].source, b[i].source)
        assert torch.equal(a[i].target, b[i].target)
        assert (a[i].encoder_route, a[i].decoder_route) == (b[i].encoder_route, b[i].decoder_route)


# ------------------------------------------------------------------------------------------ spectral view
@pytest.fixture(scope="module")
def spectral(view, work):
    return variants.spectral_view(DATA, DATA / "test.tsv", view / "test_spectral.tsv", work / "audio16k")


def test_spectral_detection_on_the_fixture(spectral, view):
    """Every NB clip (8 kHz telephone channel) is detected nb, every WB clip wb (threshold -50 dB)."""
    assert spectral["rows"] == 8
    assert spectral["detected"] == {"nb": {"nb": 4}, "wb": {"wb": 4}}
    rows = rows_of(view / "test_spectral.tsv")
    assert all(r["bandwidth"] == "" for r in rows)
    for r in rows:
        assert Path(r["audio"]).is_absolute() and sf.info(r["audio"]).samplerate == audio.TARGET_SAMPLE_RATE
    cfg = yaml.safe_load(Path(spectral["config"]).read_text())
    assert cfg["smoe"]["bandwidth_detection"] == "spectral"


def test_spectral_view_is_routed_by_detection_with_the_original_features(spectral, view):
    original = make_task(DATA, "test").datasets["test"]
    task = make_task(view, "test_spectral", spectral["config"])
    assert task.smoe_cfg.bandwidth_detection == "spectral"
    ds = task.datasets["test_spectral"]
    assert list(ds.bandwidths) == list(original.bandwidths)  # detected = the labels on this fixture
    assert list(ds.encoder_routes) == list(original.encoder_routes)
    for i in range(len(ds)):  # the 16 kHz float copy gives the model the features of the 8 kHz original
        np.testing.assert_allclose(ds[i].source.numpy(), original[i].source.numpy(), rtol=0, atol=1e-6)


def test_spectral_view_resumes(spectral, view, work):
    written = sorted((work / "audio16k").iterdir())
    assert len(written) == 2  # the two 8 kHz clips; WB rows name the original 16 kHz files
    stamps = [p.stat().st_mtime_ns for p in written]
    again = variants.spectral_view(DATA, DATA / "test.tsv", view / "test_spectral.tsv", work / "audio16k")
    assert again["detected"] == spectral["detected"]
    assert [p.stat().st_mtime_ns for p in sorted((work / "audio16k").iterdir())] == stamps


def test_spectral_view_decodes_with_fairseq_generate(spectral, view, work, original_hyps):
    hyps = generate(view, "test_spectral", CKPT, work, spectral["config"])
    assert hyps == original_hyps  # same features, same (detected) routes


# ------------------------------------------------------------------------------------------- reroute
@pytest.fixture(scope="module")
def rerouted(work):
    out = work / "rerouted.pt"
    return out, variants.reroute_decoder(CKPT, out)


def test_rerouted_tensors(rerouted):
    path, mapping = rerouted
    assert mapping == {"transcribe": "translate", "translate": "transcribe"}
    before = checkpoint_utils.load_checkpoint_to_cpu(str(CKPT))["model"]
    after = checkpoint_utils.load_checkpoint_to_cpu(str(path))["model"]
    assert set(before) == set(after)
    n_expert = 0
    for k, v in before.items():
        if EXPERT.match(k):
            n_expert += 1
            assert torch.equal(after[k][0], v[1]) and torch.equal(after[k][1], v[0]), k
        else:
            assert torch.equal(after[k], v), k
    assert n_expert == 4  # 1 decoder layer x fc1/fc2 x weight/bias
    assert signature.decode(after[signature.SIGNATURE_KEY]) == signature.decode(before[signature.SIGNATURE_KEY])


def test_reroute_twice_restores(rerouted, work):
    back = work / "rerouted_twice.pt"
    variants.reroute_decoder(rerouted[0], back)
    before = checkpoint_utils.load_checkpoint_to_cpu(str(CKPT))["model"]
    again = checkpoint_utils.load_checkpoint_to_cpu(str(back))["model"]
    assert all(torch.equal(again[k], v) for k, v in before.items())


def test_rerouted_asr_logits_and_hypotheses_differ(rerouted, work, original_hyps):
    task = make_task(DATA, "test")
    ds = task.datasets["test"]
    asr = [i for i in range(len(ds)) if ds.routing_table.is_asr_task(ds.tasks[i])]
    batch = ds.collater([ds[i] for i in asr])
    inputs = {k: v for k, v in batch["net_input"].items()}
    models = {}
    for name, path in (("original", CKPT), ("rerouted", rerouted[0])):
        model = checkpoint_utils.load_model_ensemble([str(path)], task=task)[0][0].eval()
        with torch.no_grad():
            models[name] = model(**inputs)[0]
    gap = (models["original"] - models["rerouted"]).abs().max().item()
    assert gap > 1e-3, gap
    hyps = generate(DATA, "test", rerouted[0], work)
    changed = [i for i in original_hyps if hyps[i] != original_hyps[i] and "_asr_" in i]
    assert changed, (hyps, original_hyps)


def test_reroute_three_routes(work):
    """Two ST routes: each takes the ASR expert; the ASR route takes the first ST route's."""
    state = checkpoint_utils.load_checkpoint_to_cpu(str(CKPT))
    state["cfg"] = OmegaConf.to_container(state["cfg"], resolve=True, enum_to_str=True)
    state["cfg"]["model"].decoder_routes = "transcribe,translate:es,translate:de"
    for k, v in list(state["model"].items()):
        if EXPERT.match(k):
            state["model"][k] = torch.cat([v, v[1:] + 1.0])
    src = work / "three.pt"
    checkpoint_utils.torch_persistent_save(state, str(src))
    mapping = variants.reroute_decoder(src, work / "three_rerouted.pt")
    assert mapping == {"transcribe": "translate:es", "translate:es": "transcribe", "translate:de": "transcribe"}
    after = checkpoint_utils.load_checkpoint_to_cpu(str(work / "three_rerouted.pt"))["model"]
    for k, v in state["model"].items():
        if EXPERT.match(k):
            assert torch.equal(after[k], v[[1, 0, 0]]), k
    table = RoutingTable(decoder_routes=("transcribe", "translate:es", "translate:de"))
    assert list(table.asr_decoder_routes()) == [True, False, False]


@pytest.fixture(scope="module")
def base_ckpt(work) -> Path:
    """The dense Base: expert 0 of the pre_move S-MoE, saved as fairseq-train saves (as tests/test_upcycle.py)."""
    state = checkpoint_utils.load_checkpoint_to_cpu(str(CKPT))
    args = copy.deepcopy(state["cfg"]["model"])
    args.arch = args._name = "s2t_smoe_base_xs"
    args.encoder_smoe = args.decoder_smoe = False
    weights = {k: (v[0].clone() if re.search(r"\.fc[12]\.(weight|bias)$", k) else v) for k, v in
               state["model"].items()}
    cfg = OmegaConf.to_container(state["cfg"], resolve=True, enum_to_str=True)
    cfg["model"] = args
    path = work / "base.pt"
    checkpoint_utils.torch_persistent_save({"args": None, "cfg": cfg, "model": weights, "optimizer_history":
                                            state["optimizer_history"], "extra_state": state["extra_state"],
                                            "task_state": {}, "last_optimizer_state": None}, str(path))
    return path


def test_reroute_refuses_models_without_decoder_experts(base_ckpt, work):
    with pytest.raises(ValueError, match=rf"{re.escape(str(base_ckpt))}: s2t_smoe_base_xs has fewer than 2 decoder"):
        variants.reroute_decoder(base_ckpt, work / "never.pt")
    lmoe = DATA / "s2t_encdec_lmoe_xs.pt"
    with pytest.raises(ValueError, match=rf"{re.escape(str(lmoe))}: architecture 's2t_encdec_lmoe_xs' is not an S-MoE"):
        variants.reroute_decoder(lmoe, work / "never.pt")
    with pytest.raises(ValueError, match="must not replace its source"):
        variants.reroute_decoder(CKPT, CKPT)
    assert not (work / "never.pt").exists()
