"""``python -m fairseq_smoe.cli.upcycle``: a dense checkpoint becomes every S-MoE / learned-gate system of its size,
equal to the dense model at step 0 for every route (logits within 1e-5, identical fairseq-generate hypotheses),
then trains with ``fairseq-train --finetune-from-model`` and resumes.

Data: tests/data/pre_move (8 utterances: ASR/ST x NB/WB, config.yaml, SentencePiece dictionary with the guiding
tokens). The dense source is a trained one, so that the hypotheses are real sequences: the plugin's Base built
from expert 0 (the WB / transcribe expert) of every FFN of the trained tiny s2t_encdec_smoe_xs checkpoint there,
saved as fairseq-train saves (cfg with the model Namespace, state dict with the Base's signature). The stock
source is fairseq's own S2TTransformerModel with the same weights minus the guiding-token rows, built from
fairseq's own argument parser and saved with the ``cfg`` fairseq derives from those arguments.
"""

import copy
import csv
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import fairseq_smoe  # noqa: F401  (registers the plugin, installs the checkpoint allow-list)
from fairseq import checkpoint_utils, options
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.modules.fairseq_dropout import FairseqDropout
from omegaconf import OmegaConf

from fairseq_smoe.checkpoint import signature
from fairseq_smoe.cli import upcycle as up
from fairseq_smoe.data.vocab import guiding_tokens
from fairseq_smoe.models import s2t_lmoe, s2t_smoe
from fairseq_smoe.routing import RoutingTable
from fairseq_smoe.tasks.speech_to_text_smoe import SpeechToTextSMoETask

DATA = Path(__file__).resolve().parent / "data" / "pre_move"
PLUGIN = Path(__file__).resolve().parents[1] / "fairseq_smoe"
BIN = Path(sys.executable).parent
# every target of one size: all the _xs systems (the dense model has tiny overrides of _xs, which carry over)
TARGETS = sorted(a for a in list(s2t_smoe.ARCHITECTURES) + list(s2t_lmoe.ARCHITECTURES) if a.endswith("_xs"))
TINY = ["--encoder-layers", "2", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2", "--conv-channels", "32"]
GENERATE = ["--gen-subset", "test", "--max-tokens", "20000", "--beam", "3", "--max-len-b", "20", "--cpu"]
FFN = re.compile(r"\.fc[12]\.(weight|bias)$")


# ------------------------------------------------------------------------------------------------- helpers
def make_task(data: Path, config_yaml: str = "config.yaml") -> SpeechToTextSMoETask:
    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(parser, [str(data), "--task", "speech_to_text_smoe", "--config-yaml",
                                                config_yaml, "--cpu"])
    task = SpeechToTextSMoETask.setup_task(args)
    task.load_dataset("test")
    return task


def whole_test_set(task) -> dict:
    """All 8 rows in one batch: every encoder and decoder route mixed."""
    ds = task.datasets["test"]
    return ds.collater([ds[i] for i in range(len(ds))])


def load(path: Path, task):
    models, _ = checkpoint_utils.load_model_ensemble([str(path)], task=task)
    return models[0].eval()


def logits(model, net_input: dict, prev=None, enc=None, dec=None) -> torch.Tensor:
    """Teacher-forced decoder logits; ``enc``/``dec`` force every row onto one route (no host plan then)."""
    kwargs = {k: v for k, v in net_input.items() if k in ("src_tokens", "src_lengths", "prev_output_tokens",
                                                           "encoder_route_ids", "decoder_route_ids", "route_plan")}
    if prev is not None:
        kwargs["prev_output_tokens"] = prev
    if enc is not None or dec is not None:
        rows = kwargs["src_tokens"].size(0)
        kwargs.pop("route_plan", None)
        kwargs["encoder_route_ids"] = torch.full((rows,), enc, dtype=torch.long)
        kwargs["decoder_route_ids"] = torch.full((rows,), dec, dtype=torch.long)
    with torch.no_grad():
        return model(**kwargs)[0]


def generate(data: Path, ckpt: Path, out_dir: Path, config_yaml: str = "config.yaml") -> dict:
    """fairseq-generate's own main (fairseq_cli.generate), in this process: id -> (tokens, text, score, positional)."""
    from fairseq_cli import generate as fairseq_generate

    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(parser, [str(data), "--user-dir", str(PLUGIN), "--task", "speech_to_text_smoe",
                                                "--config-yaml", config_yaml, "--path", str(ckpt), *GENERATE,
                                                "--results-path", str(out_dir)])
    fairseq_generate.main(args)
    text = (out_dir / "generate-test.txt").read_text(encoding="utf-8")
    hyps = {m.group(1): {"tokens": m.group(3), "score": float(m.group(2))}
            for m in re.finditer(r"^H-(\d+)\t(\S+)\t(.*)$", text, re.M)}
    for m in re.finditer(r"^D-(\d+)\t\S+\t(.*)$", text, re.M):
        hyps[m.group(1)]["text"] = m.group(2)
    for m in re.finditer(r"^P-(\d+)\t(.*)$", text, re.M):
        hyps[m.group(1)]["positional"] = [float(x) for x in m.group(2).split()]
    assert len(hyps) == 8, text[-2000:]
    return hyps


def assert_same_hypotheses(got: dict, want: dict):
    assert {k: (v["tokens"], v["text"]) for k, v in got.items()} == {k: (v["tokens"], v["text"]) for k, v in
                                                                    want.items()}
    for k, v in want.items():
        assert got[k]["score"] == pytest.approx(v["score"], abs=1e-4), k
        assert got[k]["positional"] == pytest.approx(v["positional"], abs=1e-4), k


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, FairseqDropout):
            m.p = 0.0


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("upcycle")


@pytest.fixture(scope="module")
def dense_ckpt(work) -> Path:
    """The plugin's dense Base (s2t_smoe_base_xs + tiny overrides): expert 0 of the trained pre_move S-MoE."""
    state = checkpoint_utils.load_checkpoint_to_cpu(str(DATA / "s2t_encdec_smoe_xs.pt"))
    args = copy.deepcopy(state["cfg"]["model"])
    args.arch = args._name = "s2t_smoe_base_xs"
    args.encoder_smoe = args.decoder_smoe = False
    weights = {k: (v[0].clone() if FFN.search(k) else v) for k, v in state["model"].items()}
    sig = signature.decode(state["model"][signature.SIGNATURE_KEY])
    sig["encoder_routes"] = sig["decoder_routes"] = None  # a model without experts
    weights[signature.SIGNATURE_KEY] = signature.encode(sig)
    cfg = OmegaConf.to_container(state["cfg"], resolve=True, enum_to_str=True)
    cfg["model"] = args
    path = work / "dense_base.pt"
    checkpoint_utils.torch_persistent_save({"args": None, "cfg": cfg, "model": weights, "optimizer_history":
                                            state["optimizer_history"], "extra_state": state["extra_state"],
                                            "task_state": {}, "last_optimizer_state": None}, str(path))
    return path


@pytest.fixture(scope="module")
def task():
    return make_task(DATA)


@pytest.fixture(scope="module")
def sample(task):
    return whole_test_set(task)


@pytest.fixture(scope="module")
def dense_model(dense_ckpt, task):
    return load(dense_ckpt, task)


@pytest.fixture(scope="module")
def dense_hyps(dense_ckpt, work):
    return generate(DATA, dense_ckpt, work / "gen_dense")


@pytest.fixture(scope="module")
def upcycled(dense_ckpt, work):
    """Every _xs target, upcycled in this process: arch -> (checkpoint, upcycle()'s report)."""
    out = {}
    for arch in TARGETS:
        info = up.upcycle(str(dense_ckpt), arch, str(work / f"{arch}.pt"), data=str(DATA))
        out[arch] = (Path(info["out"]), info)
    return out


# ------------------------------------------------------------------------------ step 0: plugin Base source
@pytest.mark.parametrize("arch", TARGETS)
def test_step0_logits_equal_dense_for_every_route(arch, upcycled, task, sample, dense_model):
    model = load(upcycled[arch][0], task)
    table = task.routing_table
    net_input = sample["net_input"]
    real = sample["target"].ne(task.tgt_dict.pad())
    real[:, : sample["decoder_prefix"].size(1)] = True  # the prefix positions are decoder inputs too
    cases = [(None, None)] + [(e, d) for e in range(table.num_encoder_routes) for d in range(table.num_decoder_routes)]
    for enc, dec in cases:  # the batch's own mixed routes, then every (bandwidth, task) route pair forced
        want = logits(dense_model, net_input, enc=enc, dec=dec)
        got = logits(model, net_input, enc=enc, dec=dec)
        diff = (got - want).abs()[real].max().item()
        assert diff <= 1e-5, (arch, enc, dec, diff)


@pytest.mark.parametrize("arch", TARGETS)
def test_step0_generate_identical(arch, upcycled, dense_hyps, work):
    got = generate(DATA, upcycled[arch][0], work / f"gen_{arch}")
    assert_same_hypotheses(got, dense_hyps)


def test_upcycled_weights_are_the_documented_copies(upcycled, dense_ckpt):
    dense = checkpoint_utils.load_checkpoint_to_cpu(str(dense_ckpt))["model"]
    key1, key2 = "decoder.layers.0.fc1.weight", "decoder.layers.0.fc2.weight"
    smoe = checkpoint_utils.load_checkpoint_to_cpu(str(upcycled["s2t_encdec_smoe_xs"][0]))["model"]
    assert smoe["encoder.transformer_layers.1.fc1.weight"].shape == (2, 64, 32)
    for e in range(2):
        assert torch.equal(smoe[key1][e], dense[key1]) and torch.equal(smoe[key2][e], dense[key2])
    lmoe = checkpoint_utils.load_checkpoint_to_cpu(str(upcycled["s2t_encdec_lmoe_xs"][0]))
    assert torch.equal(lmoe["model"][key2][1], 2 * dense[key2])  # E = 2 experts: fc2 x 2, the gate gives 1/2
    assert torch.equal(lmoe["model"]["decoder.layers.0.fc2.bias"][0], 2 * dense["decoder.layers.0.fc2.bias"])
    assert torch.equal(lmoe["model"]["decoder.layers.0.fc1.gate.weight"], torch.zeros(2, 32))
    assert lmoe["cfg"]["model"].criterion == s2t_lmoe.MOE_CRITERION
    wide = checkpoint_utils.load_checkpoint_to_cpu(str(upcycled["s2t_dec_ffnx2_xs"][0]))["model"]
    assert torch.equal(wide[key1], torch.cat([dense[key1], dense[key1]]))
    assert torch.equal(wide[key2], torch.cat([dense[key2] / 2, dense[key2] / 2], dim=1))
    assert wide["encoder.transformer_layers.0.fc1.weight"].shape == (64, 32)  # the encoder FFN stays
    # the signatures name the target's routes and the data's dictionary
    for arch, (path, _) in upcycled.items():
        sig = signature.decode(checkpoint_utils.load_checkpoint_to_cpu(str(path))["model"][signature.SIGNATURE_KEY])
        enc = "_enc_" in arch or "_encdec_" in arch
        dec = "_dec_" in arch and "ffnx2" not in arch or "_encdec_" in arch
        assert sig["encoder_routes"] == (["wb", "nb"] if enc else None), arch
        assert sig["decoder_routes"] == (["transcribe", "translate"] if dec else None), arch
        assert sig["dictionary_md5"] == signature.dictionary_md5(Dictionary.load(str(DATA / "spm.txt")))


def test_learned_gate_training_mode_at_step0(upcycled, task, sample, dense_model):
    """What holds in training: the tied zero gate sends every token to expert 0, whose capacity
    ceil(1.25 n / 2) drops the documented fraction; with --moe-capacity-factor 2 (= E) nothing is dropped and
    the training forward (dropout off) equals the dense model's."""
    model = load(upcycled["s2t_encdec_lmoe_xs"][0], task)
    no_dropout(model)
    model.train()
    net_input = {k: v for k, v in sample["net_input"].items() if k in ("src_tokens", "src_lengths",
                                                                        "prev_output_tokens")}
    with torch.no_grad():
        enc_out = dense_model.encoder(net_input["src_tokens"], net_input["src_lengths"])
        _, extra = model(**net_input)
    n_enc = int((~enc_out["encoder_padding_mask"][0]).sum())
    n_dec = int(net_input["prev_output_tokens"].ne(task.tgt_dict.pad()).sum())
    dropped = [float(r["dropped"]) for r in extra[s2t_lmoe.AUX_KEY]]
    want = [1 - math.ceil(1.25 * n / 2) / n for n in (n_enc, n_enc, n_dec)]  # 2 encoder layers, 1 decoder layer
    assert dropped == pytest.approx(want, abs=1e-6)
    assert min(dropped) > 0.3
    for module in model.modules():
        if isinstance(module, s2t_lmoe.SwitchLinear):
            module.state.capacity_factor = 2.0
    real = sample["target"].ne(task.tgt_dict.pad())
    real[:, : sample["decoder_prefix"].size(1)] = True
    with torch.no_grad():
        got, extra = model(**net_input)
    assert [float(r["dropped"]) for r in extra[s2t_lmoe.AUX_KEY]] == [0.0, 0.0, 0.0]
    assert (got - logits(dense_model, sample["net_input"])).abs()[real].max().item() <= 1e-5


def test_gate_std_spreads_tokens_and_stays_close(dense_ckpt, work, task, sample, dense_model):
    path = work / "lmoe_noisy.pt"
    up.upcycle(str(dense_ckpt), "s2t_dec_lmoe_xs", str(path), data=str(DATA), gate_std=1e-3)
    model = load(path, task)
    gate = model.decoder.layers[0].fc1.gate.weight
    assert gate.abs().max().item() > 0
    real = sample["target"].ne(task.tgt_dict.pad())
    diff = (logits(model, sample["net_input"]) - logits(dense_model, sample["net_input"])).abs()[real].max().item()
    assert 0 < diff < 0.05  # close, no longer exact


# ----------------------------------------------------------------------------------- stock s2t_transformer
@pytest.fixture(scope="module")
def stock(work, dense_ckpt):
    """A stock fairseq s2t_transformer checkpoint (fairseq's own model class, arguments and cfg) with a
    dictionary without guiding tokens, its data directory (a copy of pre_move naming that dictionary)."""
    from fairseq.models.speech_to_text.s2t_transformer import S2TTransformerModel

    root = work / "stock_data"
    shutil.copytree(DATA, root, ignore=shutil.ignore_patterns("*.pt", "expected.json", "make.py"))
    plugin_dict = Dictionary.load(str(DATA / "spm.txt"))
    special = set(guiding_tokens(["en", "es"]))
    stock_dict = Dictionary()
    for sym in plugin_dict.symbols[plugin_dict.nspecial:]:
        if sym not in special:
            stock_dict.add_symbol(sym)
    stock_dict.save(str(root / "stock.txt"))
    config = yaml.safe_load((DATA / "config.yaml").read_text())
    config.pop("smoe")
    config["vocab_filename"] = "stock.txt"
    (root / "config.yaml").write_text(yaml.safe_dump(config))

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(root), "--task", "speech_to_text", "--arch", "s2t_transformer",
                                                *TINY, "--config-yaml", "config.yaml", "--optimizer", "adam",
                                                "--lr", "1e-3", "--criterion", "label_smoothed_cross_entropy"])
    args.input_feat_per_channel, args.input_channels = 80, 1
    from fairseq_smoe.tasks.dictionary_only import DictionaryOnlyTask

    task = DictionaryOnlyTask(len(stock_dict))
    task.target_dictionary = task.tgt_dict = stock_dict
    model = S2TTransformerModel.build_model(copy.deepcopy(args), task)
    dense = checkpoint_utils.load_checkpoint_to_cpu(str(dense_ckpt))["model"]
    keep = [plugin_dict.index(s) for s in plugin_dict.symbols if s not in special]
    weights = {k: (v[keep] if v.dim() and v.shape[0] == len(plugin_dict) else v)
               for k, v in dense.items() if k != signature.SIGNATURE_KEY}
    model.load_state_dict(weights, strict=True)
    cfg = convert_namespace_to_omegaconf(args)
    path = work / "stock.pt"
    checkpoint_utils.torch_persistent_save(
        {"args": None, "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "model": model.state_dict(),
         "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion", "optimizer_name": "Adam",
                                "lr_scheduler_state": {}, "num_updates": 80}],
         "extra_state": {"train_iterator": {"epoch": 1}}, "last_optimizer_state": None}, str(path))
    return {"ckpt": path, "root": root, "dict": stock_dict, "model": model.eval()}


@pytest.fixture(scope="module")
def stock_upcycled(stock, work):
    """Every target from the stock checkpoint: the Base through the command line (its log and files), the
    others in this process; then the data directory's second config naming the extended dictionary."""
    base = work / "from_stock" / "s2t_smoe_base_xs.pt"
    proc = subprocess.run([sys.executable, "-m", "fairseq_smoe.cli.upcycle", "--dense", str(stock["ckpt"]),
                           "--arch", "s2t_smoe_base_xs", "--out", str(base), "--langs", "en,es",
                           "--keep-source-size"],
                          cwd=PLUGIN.parent, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new_dict = base.with_suffix(".dict.txt")
    log = proc.stdout + proc.stderr
    assert f"wrote {new_dict}" in log
    assert "appended 4 guiding token(s) ['<transcribe>', '<translate>', '<lang:en>', '<lang:es>']" in log
    shutil.copyfile(new_dict, stock["root"] / "upcycled.txt")
    config = yaml.safe_load((stock["root"] / "config.yaml").read_text())
    config["vocab_filename"] = "upcycled.txt"
    (stock["root"] / "config_upcycled.yaml").write_text(yaml.safe_dump(config))
    out = {"s2t_smoe_base_xs": base}
    for arch in TARGETS:
        if arch != "s2t_smoe_base_xs":
            info = up.upcycle(str(stock["ckpt"]), arch, str(work / "from_stock" / f"{arch}.pt"),
                              langs=["en", "es"], keep_source_size=True)
            assert info["appended_tokens"] == ["<transcribe>", "<translate>", "<lang:en>", "<lang:es>"]
            out[arch] = Path(info["out"])
    return out


def test_stock_dictionary_extended_after_its_entries(stock, stock_upcycled):
    new = Dictionary.load(str(stock_upcycled["s2t_smoe_base_xs"].with_suffix(".dict.txt")))
    old = stock["dict"]
    assert new.symbols[: len(old)] == old.symbols  # every stock token keeps its id
    assert new.symbols[len(old):] == ["<transcribe>", "<translate>", "<lang:en>", "<lang:es>"]
    state = checkpoint_utils.load_checkpoint_to_cpu(str(stock_upcycled["s2t_dec_smoe_xs"]))
    embed = state["model"]["decoder.embed_tokens.weight"]
    stock_embed = stock["model"].decoder.embed_tokens.weight.detach()
    assert torch.equal(embed[: len(old)], stock_embed)
    assert torch.allclose(embed[len(old):], stock_embed.mean(0).expand(4, -1))
    assert torch.equal(state["model"]["decoder.output_projection.weight"][len(old):], torch.zeros(4, 32))
    sig = signature.decode(state["model"][signature.SIGNATURE_KEY])
    assert sig["dictionary_md5"] == signature.dictionary_md5(new) and sig["decoder_routes"] == ["transcribe",
                                                                                                  "translate"]


@pytest.mark.parametrize("arch", TARGETS)
def test_stock_step0_logits_on_the_stock_inputs(arch, stock, stock_upcycled):
    """On the stock model's own token sequences (no guiding prefix), every route: the stock vocabulary's logits
    within 1e-5, the appended tokens' exactly 0."""
    task = make_task(stock["root"], "config_upcycled.yaml")
    sample = whole_test_set(task)
    prefix, eos, pad = sample["decoder_prefix"].size(1), task.tgt_dict.eos(), task.tgt_dict.pad()
    target = sample["target"][:, prefix:]
    prev = torch.cat([torch.full((target.size(0), 1), eos), target[:, :-1]], dim=1)
    real = target.ne(pad)
    net_input = sample["net_input"]
    with torch.no_grad():
        want = stock["model"](net_input["src_tokens"], net_input["src_lengths"], prev)[0]
    model = load(stock_upcycled[arch], task)
    old = len(stock["dict"])
    table = task.routing_table
    for enc, dec in [(None, None)] + [(e, d) for e in range(table.num_encoder_routes)
                                      for d in range(table.num_decoder_routes)]:
        got = logits(model, net_input, prev=prev, enc=enc, dec=dec)
        assert (got[..., :old] - want).abs()[real].max().item() <= 1e-5, (arch, enc, dec)
        assert torch.equal(got[..., old:][real], torch.zeros_like(got[..., old:][real]))


@pytest.fixture(scope="module")
def stock_base_hyps(stock, stock_upcycled, work):
    return generate(stock["root"], stock_upcycled["s2t_smoe_base_xs"], work / "gen_stock_base", "config_upcycled.yaml")


@pytest.mark.parametrize("arch", [a for a in TARGETS if a != "s2t_smoe_base_xs"])
def test_stock_step0_generate_identical_to_its_base(arch, stock, stock_upcycled, stock_base_hyps, work):
    """Through the plugin's decoding (guiding prefix forced), every system upcycled from the stock checkpoint
    decodes as the Base upcycled from it."""
    got = generate(stock["root"], stock_upcycled[arch], work / f"gen_stock_{arch}", "config_upcycled.yaml")
    assert_same_hypotheses(got, stock_base_hyps)


# ------------------------------------------------------------------------------------------------- errors
def run_main(capsys, *argv) -> str:
    code = up.main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_unknown_architecture(capsys, dense_ckpt, work):
    err = run_main(capsys, "--dense", str(dense_ckpt), "--arch", "s2t_dec_smoe_xxl", "--out", str(work / "x.pt"))
    assert "--arch s2t_dec_smoe_xxl: unknown architecture" in err and "s2t_encdec_lmoe_xs" in err


def test_output_exists(capsys, dense_ckpt, work):
    there = work / "exists.pt"
    there.write_bytes(b"keep me")
    err = run_main(capsys, "--dense", str(dense_ckpt), "--arch", "s2t_dec_smoe_xs", "--out", str(there))
    assert f"--out {there} exists" in err
    assert there.read_bytes() == b"keep me"


def test_size_mismatch(capsys, dense_ckpt, work):
    err = run_main(capsys, "--dense", str(dense_ckpt), "--arch", "s2t_dec_smoe_s", "--out", str(work / "s.pt"),
                   "--data", str(DATA))
    assert "size mismatch: --arch s2t_dec_smoe_s" in err and str(dense_ckpt) in err
    assert "encoder_layers: s2t_dec_smoe_s has 12" in err and "--keep-source-size" in err
    assert not (work / "s.pt").exists()


@pytest.mark.parametrize("name", ["s2t_encdec_smoe_xs", "s2t_encdec_lmoe_xs"])
def test_source_not_dense(capsys, name, work):
    err = run_main(capsys, "--dense", str(DATA / f"{name}.pt"), "--arch", "s2t_dec_smoe_xs",
                   "--out", str(work / "nd.pt"), "--data", str(DATA))
    assert f"--dense {DATA / (name + '.pt')} is not dense" in err


def test_dec_ffnx2_source_is_not_the_base(capsys, upcycled, work):
    err = run_main(capsys, "--dense", str(upcycled["s2t_dec_ffnx2_xs"][0]), "--arch", "s2t_dec_smoe_xs",
                   "--out", str(work / "w.pt"), "--data", str(DATA))
    assert "decoder FFN 128 wide and an encoder FFN 64 wide" in err


def test_missing_dense_file(capsys, work):
    err = run_main(capsys, "--dense", str(work / "nope.pt"), "--arch", "s2t_dec_smoe_xs", "--out", str(work / "n.pt"))
    assert f"--dense {work / 'nope.pt'}: no such file" in err


def test_stock_without_languages(capsys, stock, work):
    err = run_main(capsys, "--dense", str(stock["ckpt"]), "--arch", "s2t_dec_smoe_xs", "--out", str(work / "l.pt"),
                   "--keep-source-size")
    assert "--langs" in err


# --------------------------------------------------------------------------------- training and resuming
@pytest.fixture(scope="module")
def train_data(work) -> Path:
    """pre_move's 8 utterances as a train split (fairseq's S2T task wants train* names)."""
    root = work / "train_data"
    shutil.copytree(DATA, root, ignore=shutil.ignore_patterns("*.pt", "expected.json", "make.py"))
    shutil.copyfile(root / "test.tsv", root / "train.tsv")
    return root


@pytest.mark.parametrize("arch", ["s2t_encdec_smoe_xs", "s2t_encdec_lmoe_xs"])
def test_finetune_then_resume(arch, upcycled, train_data, work):
    path, info = upcycled[arch]
    save = work / f"train_{arch}"
    crit = s2t_lmoe.MOE_CRITERION if "lmoe" in arch else "label_smoothed_cross_entropy"

    def train(max_update):
        cmd = [str(BIN / "fairseq-train"), str(train_data), "--user-dir", str(PLUGIN), "--task", "speech_to_text_smoe",
               "--config-yaml", "config.yaml", "--arch", arch, *info["train_flags"], "--criterion", crit,
               "--label-smoothing", "0.1", "--train-subset", "train", "--valid-subset", "test",
               "--disable-validation", "--optimizer", "adam", "--lr", "1e-3", "--max-sentences", "4",
               "--max-update", str(max_update), "--seed", "1", "--save-dir", str(save), "--cpu", "--num-workers",
               "0", "--no-epoch-checkpoints", "--finetune-from-model", str(path)]
        proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return proc.stdout + proc.stderr

    log = train(2)
    assert f"loading pretrained model from {path}" in log
    assert checkpoint_utils.load_checkpoint_to_cpu(str(save / "checkpoint_last.pt"))["optimizer_history"][-1][
        "num_updates"] == 2
    log = train(4)
    assert re.search(rf"Loaded checkpoint {re.escape(str(save / 'checkpoint_last.pt'))} \(epoch \d+ @ 2 updates\)",
                     log), log[-3000:]
    assert "loading pretrained model from" not in log  # checkpoint_last.pt wins over --finetune-from-model
    last = checkpoint_utils.load_checkpoint_to_cpu(str(save / "checkpoint_last.pt"))
    assert last["optimizer_history"][-1]["num_updates"] == 4


# ------------------------------------------------------------------------------------ sizes and routes
def test_size_by_name_or_by_value():
    """The dense run's own overrides carry over (same named size); a stock model whose dimensions equal the
    paper size (s2t_transformer_m) needs no flag; fairseq's s2t_transformer_s is no plugin size."""
    tiny = up.arch_defaults("s2t_smoe_base_xs")
    tiny.encoder_layers, tiny.encoder_embed_dim = 2, 32
    assert up.check_size(tiny, "s2t_smoe_base_xs", "s2t_encdec_lmoe_xs", "d.pt", False) == []
    medium = up.arch_defaults("s2t_transformer_m")
    assert up.check_size(medium, "s2t_transformer_m", "s2t_dec_smoe", "m.pt", False) == []
    small = up.arch_defaults("s2t_transformer_s")
    with pytest.raises(up.UpcycleError, match=r"encoder_ffn_embed_dim: s2t_dec_smoe_s has 1024, the dense model 2048"):
        up.check_size(small, "s2t_transformer_s", "s2t_dec_smoe_s", "s.pt", False)
    assert len(up.check_size(small, "s2t_transformer_s", "s2t_dec_smoe_s", "s.pt", True)) == 2  # FFN, conv


def test_routes_from_data_config(dense_ckpt, work, dense_model):
    """--data's config.yaml routes the target: three decoder routes give three experts (and a learned gate room
    for every token in one expert: eval capacity factor 3), still the dense model at step 0 on every route."""
    root = work / "three_routes"
    shutil.copytree(DATA, root, ignore=shutil.ignore_patterns("*.pt", "expected.json", "make.py"))
    config = yaml.safe_load((root / "config.yaml").read_text())
    config["smoe"]["decoder_routes"] = ["transcribe", "translate:es", "translate:de"]
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    task = make_task(root)
    sample = whole_test_set(task)
    real = sample["target"].ne(task.tgt_dict.pad())
    real[:, : sample["decoder_prefix"].size(1)] = True
    for arch in ("s2t_dec_smoe_xs", "s2t_dec_lmoe_xs"):
        info = up.upcycle(str(dense_ckpt), arch, str(work / f"three_{arch}.pt"), data=str(root))
        state = checkpoint_utils.load_checkpoint_to_cpu(info["out"])
        sig = signature.decode(state["model"][signature.SIGNATURE_KEY])
        assert sig["decoder_routes"] == ["transcribe", "translate:es", "translate:de"]
        assert state["model"]["decoder.layers.0.fc1.weight"].shape[0] == 3
        if "lmoe" in arch:
            assert state["cfg"]["model"].moe_eval_capacity_factor == 3.0
            assert info["train_flags"][-2:] == ["--moe-eval-capacity-factor", "3.0"]
        model = load(Path(info["out"]), task)
        for dec in range(3):
            diff = (logits(model, sample["net_input"], enc=0, dec=dec)
                    - logits(dense_model, sample["net_input"], enc=0, dec=0)).abs()[real].max().item()
            assert diff <= 1e-5, (arch, dec, diff)


def test_the_printed_continue_command_keeps_a_ctc_trained_trunk_s_ctc_head():
    """fairseq-train loads --finetune-from-model strictly: a trunk trained with CTC passes its CTC head on, so the
    continued run needs --ctc-weight (and, for a learned gate, the criterion with both CTC and the balancing loss)."""
    from argparse import Namespace

    from fairseq_smoe.models import s2t_lmoe

    assert up.criterion_flags(Namespace(ctc_weight=0.5), "s2t_encdec_lmoe_xs") == [
        "--criterion", s2t_lmoe.MOE_ASR_CTC_CRITERION, "--ctc-weight", "0.5"]
    assert up.criterion_flags(Namespace(ctc_weight=0.5), "s2t_dec_smoe_xs") == [
        "--criterion", "label_smoothed_cross_entropy_asr_ctc", "--ctc-weight", "0.5"]
    assert up.criterion_flags(Namespace(ctc_weight=0.0), "s2t_encdec_lmoe_xs") == [
        "--criterion", s2t_lmoe.MOE_CRITERION]
    assert up.criterion_flags(Namespace(), "s2t_dec_smoe_xs") == []
