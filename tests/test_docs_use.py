"""docs/use.md ("Use a trained model") and the README's section of that name run as written: every ```python block
(in order, one namespace) and every ```bash block, in a folder laid out as the pages say, on the model the hub tests
train. A block after ``<!-- needs: task-interactive -->`` calls the real ``fairseq-interactive``.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from hub_model import manifest_rows, trained_model
from test_long_audio import SR, build_recording

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "use.md"
README = REPO / "README.md"
FENCE = re.compile(r"(?:<!-- needs: (?P<needs>[\w-]+) -->\n)?```(?P<lang>python|bash)\n(?P<code>.*?)```", re.S)


def readme_section() -> str:
    """The README's "Use a trained model" section, up to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Use a trained model\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def blocks(lang, text=None):
    text = PAGE.read_text(encoding="utf-8") if text is None else text
    return [(m.group("code"), m.group("needs")) for m in FENCE.finditer(text) if m.group("lang") == lang]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, flite_cache):
    return trained_model(tmp_path_factory, flite_cache)


@pytest.fixture(scope="module")
def workdir(trained, tmp_path_factory):
    """exp/checkpoints, exp/data, audio/ (8 and 16 kHz files), recordings/ (2 minutes), files.txt, fairseq_smoe."""
    work = tmp_path_factory.mktemp("docs_use")
    data = trained["corpus"]
    (work / "exp" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(trained["model"] / "checkpoint_best.pt", work / "exp" / "checkpoints" / "checkpoint_best.pt")
    (work / "exp" / "data").mkdir()
    for name in ("config.yaml", "spm.model", "spm.txt"):
        shutil.copyfile(data / name, work / "exp" / "data" / name)
    (work / "audio").mkdir()
    shutil.copyfile(data / manifest_rows(data, "test_asr_nb")[0]["audio"], work / "audio" / "call_8k.wav")
    shutil.copyfile(data / manifest_rows(data, "test_asr_wb")[1]["audio"], work / "audio" / "lecture_16k.wav")
    (work / "recordings").mkdir()
    recording, _, _ = build_recording(data)
    sf.write(work / "recordings" / "meeting_2min.wav", recording, SR, subtype="PCM_16")
    (work / "files.txt").write_text("audio/call_8k.wav\naudio/lecture_16k.wav\n", encoding="utf-8")
    (work / "fairseq_smoe").symlink_to(REPO / "fairseq_smoe")  # the shell examples run from the repository root
    return work


def test_page_has_the_examples():
    assert len(blocks("python")) >= 5 and len(blocks("bash")) >= 3
    assert any(needs == "task-interactive" for _, needs in blocks("bash"))


def test_python_examples_run_as_written(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    namespace = {"__name__": "__docs__"}
    for code, _ in blocks("python"):
        exec(compile(code, f"{PAGE}:python", "exec"), namespace)
    out = capsys.readouterr().out
    assert "nb asr en" in out  # the route of the 8 kHz call, as the page says
    assert namespace["result"].bandwidth == "nb" and namespace["spanish"].bandwidth == "wb"
    assert namespace["spanish"].task == "st" and namespace["spanish"].lang == "es"
    assert namespace["from_array"].text == namespace["result"].text
    assert namespace["as_wideband"].bandwidth == "wb"
    assert [r.bandwidth for r in namespace["batch"]] == ["nb", "wb", "nb"]
    meeting = namespace["meeting"]
    assert meeting.duration == pytest.approx(120.0, abs=0.01) and len(meeting.segments) >= 30
    assert f"{len(meeting.segments)} segments" in out


def test_shell_examples_run_as_written(workdir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for code, needs in blocks("bash"):
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        if needs == "task-interactive":
            d_lines = [line for line in proc.stdout.splitlines() if line.startswith("D-")]
            assert [line.split("\t")[0] for line in d_lines] == ["D-0", "D-1"]
    rows = (workdir / "transcripts.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("id\tpath\tbandwidth") and len(rows) == 3  # header + the two files, once each
    translations = [json.loads(line) for line in (workdir / "translations.jsonl").read_text().splitlines()]
    assert [t["id"] for t in translations] == ["call_8k", "lecture_16k"]
    assert all(t["language"] == "es" for t in translations)
    meetings = [json.loads(line) for line in (workdir / "meetings.jsonl").read_text().splitlines()]
    assert len(meetings) == 1 and len(meetings[0]["segments"]) >= 30


def test_readme_examples_run_as_written(workdir, tmp_path, monkeypatch):
    """The README's copy of the examples (a subset of docs/use.md's), in a fresh copy of the same layout."""
    section = readme_section()
    assert len(blocks("python", section)) >= 1 and len(blocks("bash", section)) >= 1
    work = tmp_path / "work"
    shutil.copytree(workdir, work, symlinks=True,
                    ignore=shutil.ignore_patterns("transcripts.tsv", "translations.jsonl", "meetings.jsonl"))
    monkeypatch.chdir(work)
    namespace = {"__name__": "__readme__"}
    for code, _ in blocks("python", section):
        exec(compile(code, f"{README}:python", "exec"), namespace)
    assert namespace["result"].bandwidth == "nb" and namespace["spanish"].task == "st"
    assert namespace["meeting"].segments
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for code, _ in blocks("bash", section):
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=work, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    rows = (work / "transcripts.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("id\tpath\tbandwidth") and len(rows) == 3
