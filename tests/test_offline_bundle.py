"""The offline GPU bundle (scripts/offline_bundle.sh, scripts/offline/): built here, installed with no index into a
fresh Python 3.12 environment that stands in for a GPU image, and its node command run there (GPU tests skip).

The end-to-end tests need PyPI access (the build downloads wheels), flite, and a Python 3.12 virtual environment
with torch, torchaudio, numpy 2, sentencepiece and sacrebleu to take the image's packages from:
``SMOE_BUNDLE_IMAGE=.venv312`` (CI's second environment, made by ``PYTHON=python3.12 VENV=.venv312
bash scripts/setup.sh``). The "image" is a fresh virtual environment of that environment's base interpreter holding
links to just those packages and their dependencies, so the node's venv sees torch but none of what the bundle must
bring. The other tests (the import hook, the summary) run everywhere.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OFFLINE = REPO / "scripts" / "offline"
IMAGE_VENV = os.environ.get("SMOE_BUNDLE_IMAGE")
MAX_BYTES = 60_000_000
# what the wheelhouse must hold (normalized distribution names)
REQUIRED_WHEELS = {
    "fairseq_fixed", "hydra_core", "omegaconf", "antlr4_python3_runtime", "bitarray", "editdistance", "soundfile",
    "cffi", "pycparser", "pyyaml", "regex", "portalocker", "tqdm", "packaging", "pytest", "iniconfig", "pluggy",
    "webrtcvad_wheels", "fairseq_smoe",
}
IMAGE_PACKAGES = ("torch", "torchaudio", "numpy", "sentencepiece", "sacrebleu")
# no network on the node: any attempt to reach an index or a proxy fails at once
OFFLINE_ENV = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "http_proxy": "http://127.0.0.1:9",
               "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}

MAKE_IMAGE = textwrap.dedent("""
    import importlib.metadata as md, re, sys
    from pathlib import Path
    dest = Path(sys.argv[1]); dest.mkdir(parents=True, exist_ok=True)
    seen, todo = {}, sys.argv[2:]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            d = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[key] = d
        todo += [re.split(r"[ ;<>=!~\\[(]", r, maxsplit=1)[0] for r in d.requires or [] if "extra ==" not in r]
    for d in seen.values():
        for top in {f.parts[0] for f in d.files or []}:
            src, link = Path(d.locate_file(top)), dest / top
            if top not in ("..", "__pycache__") and not top.endswith(".pth") and src.exists() and not link.exists():
                link.symlink_to(src)
    print(" ".join(sorted(seen)))
""")


def _norm(wheel: str) -> str:
    return re.sub(r"[-_.]+", "_", wheel.split("-")[0]).lower()


# ---------------------------------------------------------------- end to end (needs SMOE_BUNDLE_IMAGE, network)

needs_image = pytest.mark.skipif(
    not IMAGE_VENV, reason="SMOE_BUNDLE_IMAGE=<Python 3.12 venv with torch, numpy 2, ...> not set (CI sets it)")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    venv_py = Path(IMAGE_VENV).resolve() / "bin" / "python"
    if not venv_py.is_file():
        pytest.fail(f"SMOE_BUNDLE_IMAGE={IMAGE_VENV}: no bin/python there")
    base = subprocess.run([str(venv_py), "-c", "import sys; print(sys._base_executable)"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the image: a virtual environment of its own holding links to just the image's packages (as images built with
    # python -m venv or uv do; node.sh must then reach them through a .pth file, --system-site-packages cannot)
    root = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    out = subprocess.run([str(venv_py), "-c", MAKE_IMAGE, str(site), *IMAGE_PACKAGES], capture_output=True,
                         text=True, check=True).stdout
    for pkg in IMAGE_PACKAGES:
        assert pkg in out.split(), f"{IMAGE_VENV} lacks {pkg}"
    return {"venv_python": venv_py, "python": str(python), "site": site}


@pytest.fixture(scope="module")
def built(image, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "bundle"
    start = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "offline_bundle.sh"), str(out)],
                          env={**os.environ, "BUILD_PYTHON": str(image["venv_python"]), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"\n[bundle] built in {time.monotonic() - start:.0f} s: {proc.stdout.strip().splitlines()[-2]}")
    return out


@pytest.fixture(scope="module")
def node_run(image, built, tmp_path_factory):
    """The bundle carried elsewhere (moved: no path of the build machine may survive), then its node command."""
    where = tmp_path_factory.mktemp("node") / "carried"
    shutil.move(str(built), str(where))
    results = where.parent / "results"
    env = {**os.environ, **OFFLINE_ENV, "PYTHON": image["python"]}
    for k in ("VIRTUAL_ENV", "PYTHONPATH", "SMOE_TEST_CORPUS", "SMOE_GPU_TESTS", "CUDA_VISIBLE_DEVICES"):
        env.pop(k, None)
    start = time.monotonic()
    proc = subprocess.run(["bash", str(where / "node.sh"), str(results)], env=env, capture_output=True, text=True,
                          timeout=900)
    secs = time.monotonic() - start
    print(f"\n[node] ran in {secs:.0f} s (install {_phases(results).get('install_seconds')} s)")
    return {"bundle": where, "results": results, "proc": proc, "env": env, "seconds": secs, "image": image}


def _phases(results: Path) -> dict:
    p = results / "phases.env"
    return dict(line.split("=", 1) for line in p.read_text().splitlines() if "=" in line) if p.is_file() else {}


@needs_image
def test_bundle_contents_and_size(built):
    info = json.loads((built / "BUNDLE_INFO.json").read_text())
    assert info["python"] == "3.12"
    total = sum(f.stat().st_size for f in built.rglob("*") if f.is_file())
    assert total < MAX_BYTES, f"bundle is {total / 1e6:.1f} MB"
    assert abs(total - info["bytes"]["total"]) < 10_000  # BUNDLE_INFO.json itself is written after the count
    wheels = {w.name for w in (built / "wheels").glob("*.whl")}
    names = {_norm(w) for w in wheels}
    assert REQUIRED_WHEELS <= names, f"missing: {REQUIRED_WHEELS - names}"
    # the image brings these; scikit-learn and scipy are left out on purpose (fairseq_optional_imports.py)
    assert not names & {"torch", "torchaudio", "numpy", "sentencepiece", "sacrebleu", "scipy", "scikit_learn"}
    fairseq = [w for w in wheels if _norm(w) == "fairseq_fixed"]
    assert fairseq and fairseq[0].endswith("-cp312-cp312-manylinux_2_28_x86_64.whl"), fairseq
    assert [w for w in wheels if _norm(w) == "antlr4_python3_runtime"][0].endswith("-py3-none-any.whl")
    for w in wheels:  # every binary wheel is for CPython 3.12 on manylinux x86_64
        tags = w[:-4].split("-")[-3:]
        assert tags[0] in ("py3", "py2.py3", "cp312") and (tags[2] == "any" or "manylinux" in tags[2]), w
    req = (built / "requirements-node.txt").read_text().split()
    assert {re.sub(r"[-_.]+", "_", r).lower() for r in req} == REQUIRED_WHEELS
    for name in ("node.sh", "bundle_summary.py", "fairseq_optional_imports.py", "src/benchmarks/speed.py",
                 "src/tests/conftest.py", "src/tests/fixture_corpus.py", "src/fairseq_smoe/__init__.py",
                 "corpus/config.yaml", "corpus/train.tsv", "corpus/dev.tsv"):
        assert (built / name).is_file(), name
    # relocatable corpus: every audio path relative and present, nothing absolute in config.yaml
    import csv

    for tsv in (built / "corpus").glob("*.tsv"):
        with open(tsv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        assert rows, tsv
        for r in rows:
            assert not os.path.isabs(r["audio"]) and (built / "corpus" / r["audio"]).is_file(), (tsv, r["audio"])
    assert str(built.parent) not in (built / "corpus" / "config.yaml").read_text()


@needs_image
def test_node_command_runs_offline_with_gpu_tests_skipped(node_run):
    proc, results = node_run["proc"], node_run["results"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:] + (results / "node.log").read_text()[-3000:]
    ph = _phases(results)
    assert ph["corpus_rc"] == "0" and ph["tests_rc"] in ("0", "5") and ph["bench_rc"] == "0", ph
    assert int(ph["total_seconds"]) < 480, ph
    check = (results / "corpus_check.log").read_text()
    assert check.count(" 0 problems") == 2, check[-2000:]  # train+dev, then the four test sets: all audio found
    suite = ET.parse(results / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    assert n > 0 and skipped == n and suite.get("failures") == "0" and suite.get("errors") == "0"
    summary = (results / "summary.md").read_text()
    assert f"**0 passed, 0 failed, 0 errors, {n} skipped** of {n}" in summary
    assert "no CUDA device" in summary and "numpy / fairseq | 2." in summary
    assert "fairseq.tasks.audio_classification" in summary  # the image has no scikit-learn: the hook is in use
    assert "| forward |" in (results / "speed_xs.md").read_text() and "| forward |" in summary
    assert "install_error" not in ph
    log = (results / "node.log").read_text()
    assert "the image's packages are in a virtual environment: linked " + str(node_run["image"]["site"]) in log


@needs_image
def test_node_venv_holds_the_bundle_and_uses_the_image(node_run):
    vpy = node_run["bundle"] / "venv" / "bin" / "python"
    code = textwrap.dedent("""
        import importlib, json, sys
        out = {}
        for m in ("fairseq", "fairseq_smoe", "hydra", "soundfile", "pytest", "torch", "numpy"):
            out[m] = importlib.import_module(m).__file__
        try:
            import sklearn
            out["sklearn"] = "present"
        except ModuleNotFoundError:
            out["sklearn"] = "absent"  # no fake package: only fairseq's two modules are placeholders
        from fairseq.criterions import sentence_prediction
        try:
            sentence_prediction.SentencePredictionCriterion
        except ImportError as e:
            out["placeholder"] = str(e)
        print(json.dumps(out))
    """)
    # cwd: not the repository, whose fairseq_smoe would shadow the installed wheel
    proc = subprocess.run([str(vpy), "-c", code], env=node_run["env"], capture_output=True, text=True, timeout=300,
                          cwd=node_run["results"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    venv = str(node_run["bundle"] / "venv")
    for m in ("fairseq", "fairseq_smoe", "hydra", "soundfile", "pytest"):
        assert out[m].startswith(venv), (m, out[m])
    for m in ("torch", "numpy"):
        assert out[m].startswith(str(node_run["image"]["site"])), (m, out[m])
    assert out["sklearn"] == "absent"
    assert "scikit-learn" in out["placeholder"] and "WITH_SKLEARN=1" in out["placeholder"]
    # torchrun (the suite's two-process tests call it from the venv's bin, beside fairseq-train) runs the image's torch
    run = subprocess.run([str(vpy.parent / "torchrun"), "--help"], env=node_run["env"], capture_output=True,
                         text=True, timeout=300, cwd=node_run["results"])
    assert run.returncode == 0 and "--nproc-per-node" in run.stdout.replace("_", "-"), run.stderr[-2000:]
    # fairseq itself refuses the disabled task, by name
    train = subprocess.run([str(vpy.parent / "fairseq-train"), "/nonexistent", "--task", "audio_classification"],
                           env=node_run["env"], capture_output=True, text=True, timeout=300, cwd=node_run["results"])
    assert train.returncode != 0 and "invalid choice: 'audio_classification'" in train.stderr, train.stderr[-2000:]


@needs_image
def test_node_time_box_keeps_partial_counts(node_run, tmp_path):
    """The suite rehearsed on the CPU (SMOE_GPU_TESTS=cpu) cannot finish in 15 s: pytest is interrupted at the box
    (SIGINT, as Ctrl-C), the summary still has its counts and says so, and the exit status is 1; the venv is reused (no reinstall)."""
    env = {**node_run["env"], "SMOE_GPU_TESTS": "cpu", "TEST_TIMEOUT": "15", "BENCH_TIMEOUT": "30"}
    proc = subprocess.run(["bash", str(node_run["bundle"] / "node.sh"), str(tmp_path / "r")], env=env,
                          capture_output=True, text=True, timeout=600)
    ph = _phases(tmp_path / "r")
    assert proc.returncode == 1 and ph["tests_rc"] == "124", (proc.stdout[-2000:], ph)
    assert "[node] venv " not in proc.stdout  # reused
    summary = (tmp_path / "r" / "summary.md").read_text()
    # interrupted after collection: the counts so far; during collection (a loaded machine): no report, said so
    assert re.search(r"\*\*\d+ passed, \d+ failed, \d+ errors, \d+ skipped\*\* of \d+ in \d+ s \(pytest exit 124, time box "
                     r"reached\)", summary) or "No JUnit report (pytest exit 124: time box reached)" in summary, summary
    assert "KeyboardInterrupt" in (tmp_path / "r" / "gpu_tests.log").read_text()  # SIGINT, not a kill


@needs_image
def test_node_rehearses_a_gpu_suite_test_from_the_bundle(node_run, tmp_path):
    """The bundle's layout really runs the suite: its legacy_ddp two-process test (fairseq-train through the venv's
    torchrun, validation, decoding) rehearsed on the CPU, on the bundle's corpus, from the carried folder."""
    env = {**node_run["env"], "SMOE_GPU_TESTS": "cpu", "PYTEST_ARGS": "-k legacy_ddp", "TEST_TIMEOUT": "400",
           "BENCH_TIMEOUT": "30"}
    proc = subprocess.run(["bash", str(node_run["bundle"] / "node.sh"), str(tmp_path / "r")], env=env,
                          capture_output=True, text=True, timeout=600)
    ph = _phases(tmp_path / "r")
    assert ph.get("tests_rc") != "5", "no test of tests/gpu matches -k legacy_ddp (renamed?)"
    assert proc.returncode == 0 and ph["tests_rc"] == "0", (tmp_path / "r" / "gpu_tests.log").read_text()[-4000:]
    assert "**1 passed, 0 failed, 0 errors, 0 skipped** of 1" in (tmp_path / "r" / "summary.md").read_text()


@needs_image
def test_node_refuses_another_python(node_run, tmp_path):
    other = shutil.which("python3.11") or str(Path.home() / ".pyenv/versions/3.11.7/bin/python")
    if not Path(other).exists():
        pytest.skip("no Python 3.11 to try")
    env = {**node_run["env"], "PYTHON": other, "SMOE_NODE_VENV": str(tmp_path / "v")}
    proc = subprocess.run(["bash", str(node_run["bundle"] / "node.sh"), str(tmp_path / "r")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "the bundle was built for Python 3.12" in proc.stdout and "NODE_PYTHON_VERSION=3.11" in proc.stdout
    assert "Install failed" in (tmp_path / "r" / "summary.md").read_text()
    assert not (tmp_path / "v").exists()


# ---------------------------------------------------------------- everywhere

def test_bundle_script_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("not a bundle")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "offline_bundle.sh"), str(tmp_path)],
                          env={**os.environ, "BUILD_PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=120)
    if "flite is not installed" in proc.stderr:
        pytest.skip("flite is not installed")
    assert proc.returncode == 2 and "is not a bundle: refusing to overwrite it" in proc.stderr, proc.stderr
    assert (tmp_path / "mine.txt").read_text() == "not a bundle"


HOOK_PROBE = textwrap.dedent("""
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):  # a node without scikit-learn and scipy
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("sklearn", "scipy"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    if sys.argv[1] == "block":
        sys.meta_path.insert(0, Block())
    sys.path.insert(0, sys.argv[2])
    if sys.argv[3] == "hook":
        import fairseq_optional_imports as hook
        hook.install()
    try:
        import fairseq
    except ModuleNotFoundError as e:
        print(json.dumps({"import_error": e.name}))
        sys.exit(0)
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.tasks import TASK_REGISTRY
    import fairseq_smoe  # noqa: F401  (registers the S2T task, models, criterion)
    print(json.dumps({"disabled": hook.disabled() if sys.argv[3] == "hook" else {},
                      "tasks": sorted(TASK_REGISTRY), "criteria": sorted(CRITERION_REGISTRY)}))
""")


def _probe(block: str, hook: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", HOOK_PROBE, block, str(OFFLINE), hook], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fairseq_imports_without_sklearn_only_through_the_hook():
    assert _probe("block", "nohook") == {"import_error": "sklearn"}  # why the hook exists
    out = _probe("block", "hook")
    assert out["disabled"] == {"fairseq.tasks.audio_classification": "sklearn",
                               "fairseq.criterions.sentence_prediction": "sklearn",
                               "fairseq.criterions.sentence_prediction_adapters": "sklearn"}
    assert "audio_classification" not in out["tasks"] and "sentence_prediction" not in out["criteria"]
    # everything the S2T path uses is registered
    assert {"speech_to_text", "speech_to_text_smoe"} <= set(out["tasks"])
    assert {"label_smoothed_cross_entropy", "label_smoothed_cross_entropy_moe"} <= set(out["criteria"])
    full = _probe("noblock", "hook")  # with scikit-learn installed the hook changes nothing
    assert full["disabled"] == {} and {"audio_classification"} <= set(full["tasks"])
    assert {"sentence_prediction"} <= set(full["criteria"])


def test_summary_reports_failures_and_timeouts(tmp_path):
    bundle, results = tmp_path / "b", tmp_path / "r"
    bundle.mkdir()
    results.mkdir()
    (bundle / "BUNDLE_INFO.json").write_text(json.dumps({"python": "3.12", "commit": "abc1234", "built": "x",
                                                         "bytes": {"total": 37_000_000}}))
    (results / "gpu_tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="1" time="12.5">'
        '<testcase classname="tests.gpu.test_train" name="test_fp16"><failure message="AssertionError: nan loss">'
        'trace</failure></testcase><testcase classname="c" name="ok"/><testcase classname="c" name="ok2"/>'
        '<testcase classname="c" name="cuda_only"><skipped message="CUDA-only check (NCCL)"/></testcase>'
        '</testsuite></testsuites>')
    (results / "phases.env").write_text("tests_rc=1\nbench_rc=0\nbench_sizes=\nbench_device=cuda\ntotal_seconds=99\n")
    proc = subprocess.run([sys.executable, str(OFFLINE / "bundle_summary.py"), "--bundle", str(bundle),
                           "--results", str(results)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = (results / "summary.md").read_text()
    assert "**2 passed, 1 failed, 0 errors, 1 skipped** of 4 in 12 s (pytest exit 1)" in text
    assert "- FAILURE `tests.gpu.test_train::test_fp16`: AssertionError: nan loss" in text
    assert "- skipped ×1: CUDA-only check (NCCL)" in text
    assert "No benchmark run completed inside its time box." in text
    assert "commit abc1234" in text and "37.0 MB" in text
