"""README.md and docs/*.md point only at things that exist.

The README was split into docs/ pages when the package was reorganised by role; a link, an anchor, a file path or a
``python -m`` module name that the move (or a later one) left stale would send a reader nowhere. This checks, without
importing fairseq:

* every relative Markdown link ``[text](path#anchor)`` names an existing file, and its anchor a heading of that file
  (GitHub's heading slugs);
* every repository path quoted in inline code (``fairseq_smoe/...``, ``tests/...``, ``recipes/...`` ...; braces and
  globs expanded) exists, and so does every such path to a script or source file in a code block;
* every ``python -m fairseq_smoe.<module>`` names a module file of the package;
* README.md keeps the two quick-start commands, and ``.ci/run`` runs the same test command (it runs "the README's
  test command").

HTML comments (the placeholders other pages fill in later) are not checked.
"""

import glob
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
TOP_DIRS = ("fairseq_smoe/", "tests/", "recipes/", "scripts/", "benchmarks/", "examples/", "requirements/", "docs/",
            ".ci/")
TEST_COMMAND = ".venv/bin/python -m pytest -q tests"
DEMO_COMMAND = "bash run_demo.sh"

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
COMMENT = re.compile(r"<!--.*?-->", re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`]+)`")
PATH_IN_BLOCK = re.compile(r"(?<![\w/.-])((?:%s)[\w./{},*-]*\.(?:py|sh|txt|md|json|yaml))\b" % "|".join(
    re.escape(d) for d in TOP_DIRS))
MODULE = re.compile(r"python -m (fairseq_smoe(?:\.\w+)+)(?![\w.]*<)")  # not the pattern ``fairseq_smoe.cli.<name>``


def _text(page: Path) -> str:
    return COMMENT.sub("", page.read_text(encoding="utf-8"))


def _prose(text: str) -> str:
    """The page without its code blocks (so ``# comments`` in bash blocks are neither headings nor links)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, spaces, hyphens stay),
    spaces turned into hyphens; inline-code backticks and link syntax vanish with the punctuation."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(page: Path) -> set:
    seen, out = {}, set()
    for line in _prose(_text(page)).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def expand(path: str):
    """``a/{b,c}.md`` -> ``a/b.md``, ``a/c.md`` (one brace group at a time)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in expand(path[:m.start()] + alt + path[m.end():])]


def _exists(path: str) -> bool:
    if any(ch in path for ch in "*?["):
        return bool(glob.glob(str(ROOT / path)))
    return (ROOT / path).exists()


def _quoted_paths(text: str):
    """Repository paths quoted in inline code, and script/source paths in code blocks."""
    prose = _prose(text)
    for code in INLINE_CODE.findall(prose):
        code = code.replace("\n", "").split(" ")[0]  # inline code may wrap across lines; a path leads a command
        if not code.startswith(TOP_DIRS) or "<" in code or "..." in code:
            continue
        yield code
    for block in FENCE.findall(text):
        for path in PATH_IN_BLOCK.findall(block):
            if "<" not in path:
                yield path


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_and_anchors_exist(page):
    problems = []
    for target in LINK.findall(INLINE_CODE.sub("", _prose(_text(page)))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{target}: no such file {dest.relative_to(ROOT) if ROOT in dest.parents else dest}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: {dest.name} has no heading with anchor #{anchor}")
    assert not problems, f"{page.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_quoted_paths_exist(page):
    missing = sorted({p for quoted in _quoted_paths(_text(page)) for p in expand(quoted.rstrip(".,;:"))
                      if not _exists(p)})
    assert not missing, f"{page.relative_to(ROOT)} quotes paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_m_modules_exist(page):
    missing = []
    for module in sorted(set(MODULE.findall(_text(page)))):
        rel = Path(*module.split("."))
        if not ((ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__main__.py").is_file()):
            missing.append(module)
    assert not missing, f"{page.relative_to(ROOT)}: `python -m` names modules that do not exist: {missing}"


def test_readme_keeps_the_quick_start_commands_that_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Quick start\n.*?```bash\n(.*?)```", readme, re.S)
    assert block, "README.md has no bash block under '## Quick start'"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands[:2] == [DEMO_COMMAND, TEST_COMMAND], commands
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8"), ".ci/run no longer runs it"


def test_checker_catches_stale_links(tmp_path):
    """The checks can fail: a moved page, a renamed heading and an old module name are all reported."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[a](missing.md) [b](#no-such) [c](#title) `fc2[e](relu(x))`\n"
                    "`python -m fairseq_smoe.export` `python -m fairseq_smoe.cli.<name>`\n"
                    "```bash\n# not a heading\n```\n", encoding="utf-8")
    assert anchors(page) == {"title"}
    assert slug("Checkpoints and torch >= 2.6") == "checkpoints-and-torch--26"
    assert slug("GPU test suite (`tests/gpu/`)") == "gpu-test-suite-testsgpu"
    assert slug("Host–device syncs") == "hostdevice-syncs"
    assert LINK.findall(INLINE_CODE.sub("", _prose(_text(page)))) == ["missing.md", "#no-such", "#title"]
    assert MODULE.findall(_text(page)) == ["fairseq_smoe.export"]
    assert not (ROOT / "fairseq_smoe" / "export.py").exists()
    assert expand("a/{b,c}.{md,json}") == ["a/b.md", "a/b.json", "a/c.md", "a/c.json"]
