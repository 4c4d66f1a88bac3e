"""The offline bundle's report (run by node.sh with the node venv's Python).

    python bundle_summary.py --check-install                 # exit 1, naming each problem, if the install is unusable
    python bundle_summary.py --bundle B --results R           # write R/summary.md from R's logs

The summary is one Markdown page: versions, GPU, the GPU suite's counts (from pytest's JUnit XML), the failures and
skip reasons, the figures the suite wrote (SMOE_GPU_RESULTS), and the benchmark tables speed.py wrote.
"""

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

IMPORTS = ["torch", "torchaudio", "numpy", "sentencepiece", "sacrebleu", "fairseq", "fairseq_smoe", "hydra",
           "omegaconf", "soundfile", "editdistance", "yaml", "bitarray", "regex", "pytest", "webrtcvad"]
# Distributions whose declared requirements must hold; fairseq-fixed declares the first two without needing them on
# the S2T path (cython: only to build it; scikit-learn: see fairseq_optional_imports.py), and fairseq_smoe needs
# scipy only for study/stats (imported there lazily; the GPU suite never reaches it).
CHECK_REQUIRES = ["fairseq_smoe", "fairseq-fixed", "hydra-core", "omegaconf", "soundfile", "pytest"]
ALLOWED_MISSING = {"cython", "scikit-learn", "scipy"}


def check_install() -> int:
    from importlib import metadata

    from packaging.requirements import Requirement

    problems = []
    for name in IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - every failure is reported, by name
            problems.append(f"import {name}: {type(e).__name__}: {e}")
    for dist in CHECK_REQUIRES:
        try:
            reqs = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            problems.append(f"{dist} is not installed")
            continue
        for line in reqs:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if req.name.lower() in ALLOWED_MISSING:
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{dist} requires {req}: not installed (not in the bundle nor the image)")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{dist} requires {req}: {have} is installed")
    for p in problems:
        print(f"[check-install] {p}")
    if not problems:
        print(f"[check-install] ok: {len(IMPORTS)} imports, requirements of {', '.join(CHECK_REQUIRES)}")
    return 1 if problems else 0


def read_env(path: Path) -> dict:
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                out[k] = v
    return out


def junit(path: Path) -> dict:
    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = Counter()
    failures, skips = [], Counter()
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            counts[k] += int(s.get(k, 0))
        counts["time"] += float(s.get("time", 0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            for tag in ("failure", "error"):
                for el in case.findall(tag):
                    msg = (el.get("message") or "").strip().splitlines()
                    failures.append((tag, name, msg[0][:200] if msg else ""))
            for el in case.findall("skipped"):
                skips[(el.get("message") or "").strip()[:200]] += 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"counts": counts, "failures": failures, "skips": skips}


def versions(python: str) -> dict:
    v = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "torchaudio", "numpy", "fairseq", "sentencepiece", "sacrebleu", "soundfile"):
        try:
            v[name] = importlib.import_module(name).__version__
        except Exception as e:  # noqa: BLE001
            v[name] = f"unavailable ({type(e).__name__})"
    try:
        import torch

        v["cuda"] = torch.version.cuda or "none (CPU build)"
        v["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        v["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    except Exception as e:  # noqa: BLE001
        v["gpus"] = [f"unavailable ({e})"]
    try:
        v["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - no nvidia-smi: no driver line
        v["driver"] = None
    try:
        import smoe_fairseq_optional_imports as opt  # noqa: F401 - present when node.sh installed the hook

        import fairseq  # noqa: F401
        v["disabled_fairseq_modules"] = opt.disabled()
    except ImportError:
        v["disabled_fairseq_modules"] = {}
    return v


def summary(bundle: Path, results: Path, python: str) -> str:
    info = json.loads((bundle / "BUNDLE_INFO.json").read_text()) if (bundle / "BUNDLE_INFO.json").is_file() else {}
    ph = read_env(results / "phases.env")
    v = versions(python)
    L = ["# S-MoE offline GPU bundle: node report", ""]
    if "install_error" in ph:
        L += [f"**Install failed:** {ph['install_error']}", "", "See node.log.", ""]
    gpus = ", ".join(v.get("gpus") or []) or "none (CUDA not available: GPU tests skip, benchmark is a CPU smoke run)"
    L += ["| | |", "|---|---|",
          f"| GPU | {gpus} |",
          f"| driver / CUDA / cuDNN | {v.get('driver')} / {v.get('cuda')} / {v.get('cudnn')} |",
          f"| Python | {v['python']} ({v['platform']}) |",
          f"| torch / torchaudio | {v.get('torch')} / {v.get('torchaudio')} |",
          f"| numpy / fairseq | {v.get('numpy')} / {v.get('fairseq')} |",
          f"| sentencepiece / sacrebleu / soundfile | {v.get('sentencepiece')} / {v.get('sacrebleu')} / "
          f"{v.get('soundfile')} |",
          f"| bundle | commit {info.get('commit')} (+{info.get('uncommitted_changes', 0)} uncommitted files), built "
          f"{info.get('built')}, {info.get('bytes', {}).get('total', 0) / 1e6:.1f} MB |"]
    if v.get("disabled_fairseq_modules"):
        L.append(f"| fairseq modules disabled (scikit-learn/scipy absent) | "
                 f"{', '.join(sorted(v['disabled_fairseq_modules']))} |")
    if ph:
        L.append(f"| time (s) | install {ph.get('install_seconds', '-')}, corpus check {ph.get('corpus_seconds', '-')}, "
                 f"tests {ph.get('tests_seconds', '-')} (box {ph.get('test_timeout', '-')}), benchmark "
                 f"{ph.get('bench_seconds', '-')} (box {ph.get('bench_timeout', '-')}), total "
                 f"{ph.get('total_seconds', '-')} |")
    L.append("")
    if ph.get("corpus_rc") not in (None, "0"):
        L += [f"**Corpus check failed** (exit {ph['corpus_rc']}): corpus_check.log", ""]

    j = junit(results / "gpu_tests.xml")
    L += ["## GPU suite (`python -m pytest -q tests/gpu`)", ""]
    if not j:
        rc = ph.get("tests_rc")
        L += [f"No JUnit report (pytest exit {rc}{': time box reached' if rc in ('124', '137') else ''}); "
              "see gpu_tests.log.", ""]
    else:
        c = j["counts"]
        L += [f"**{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped** of "
              f"{c['tests']} in {c['time']:.0f} s (pytest exit {ph.get('tests_rc', '?')}"
              f"{', time box reached' if ph.get('tests_rc') in ('124', '137') else ''})", ""]
        for tag, name, msg in j["failures"]:
            L.append(f"- {tag.upper()} `{name}`: {msg}")
        for msg, n in j["skips"].most_common():
            L.append(f"- skipped ×{n}: {msg}")
        L.append("")
    figs = sorted((results / "gpu_results").glob("*.json")) if (results / "gpu_results").is_dir() else []
    if figs:
        L += ["## Figures the suite measured", ""]
        for f in figs:
            try:
                txt = json.dumps(json.loads(f.read_text()), sort_keys=True)
            except ValueError:
                txt = "(unreadable JSON)"
            L.append(f"- `{f.name}`: {txt[:400]}")
        L.append("")

    L += [f"## Benchmark (`benchmarks/speed.py --devices {ph.get('bench_device', '?')}`)", ""]
    sizes = ph.get("bench_sizes", "").split()
    if ph.get("bench_rc") not in (None, "0"):
        L += [f"**Benchmark failed** (exit {ph['bench_rc']}); see speed_*.log.", ""]
    if not sizes:
        L += ["No benchmark run completed inside its time box.", ""]
    for s in sizes:
        md = results / f"speed_{s}.md"
        L += [f"**size {s}** (speed_{s}.md, speed_{s}.json)", "", md.read_text().strip() if md.is_file() else "(no table)", ""]
    return "\n".join(L) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check-install", action="store_true")
    p.add_argument("--bundle", type=Path)
    p.add_argument("--results", type=Path)
    p.add_argument("--python", default=sys.executable)
    a = p.parse_args()
    if a.check_install:
        return check_install()
    if a.bundle is None or a.results is None:
        p.error("--bundle and --results are required (or --check-install)")
    text = summary(a.bundle, a.results, a.python)
    tmp = a.results / "summary.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, a.results / "summary.md")
    print(f"[summary] {a.results / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
