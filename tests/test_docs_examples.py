"""The Python examples of the README, CONTRIBUTING.md and docs/ run as written, so they cannot rot.

A block fenced as ```python runs (the blocks of one file in order, in one namespace, so a
later block may use an earlier block's names); one fenced as ```python gpu (or any info string
after "python") is GPU-only and is not run here.  Each file's blocks run in a temporary
working directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
# optional packages an example may need: without them its file is skipped, as their own tests are
OPTIONAL = {"torch", "dask", "distributed", "sklearn", "transformers"}
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str):
    """(info string, code, line number) of every fenced block whose language is python."""
    for m in FENCE.finditer(text):
        info = m.group(1).strip()
        if info.split(" ")[0] == "python":
            yield info, m.group(2), text.count("\n", 0, m.start()) + 2


def runnable_blocks(text: str):
    return [(code, line) for info, code, line in python_blocks(text) if info == "python"]


def test_fence_parser_sorts_blocks():
    text = "x\n```python\na = 1\n```\n```python gpu\nimport cupy\n```\n```bash\nls\n```\n"
    assert [(i, c) for i, c, _ in python_blocks(text)] == [("python", "a = 1\n"),
                                                          ("python gpu", "import cupy\n")]
    assert runnable_blocks(text) == [("a = 1\n", 3)]


def test_readme_quick_start_is_run():
    """The quick start is a plain ```python block (so it runs here), its CuPy lines are not."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    run = "".join(code for code, _ in runnable_blocks(text))
    assert "gpuce.softmax_cross_entropy(logits, labels" in run
    assert "SoftmaxClassifier" in run
    assert "cupy" not in run and "cp." not in run
    assert any("cupy" in code for info, code, _ in python_blocks(text) if info != "python")


WITH_EXAMPLES = [p for p in FILES if p.exists() and runnable_blocks(p.read_text(encoding="utf-8"))]


def test_examples_found():
    names = {p.relative_to(ROOT).as_posix() for p in WITH_EXAMPLES}
    assert {"README.md", "docs/semantics.md"} <= names, names


@pytest.mark.parametrize("path", WITH_EXAMPLES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_examples_run(path, tmp_path, monkeypatch):
    blocks = runnable_blocks(path.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"example:{path.name}"}
    for code, line in blocks:
        try:
            exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in OPTIONAL:
                raise
            pytest.skip(f"{path.name}:{line} needs {e.name}")
        except Exception as e:
            raise AssertionError(f"{path.relative_to(ROOT)}, the block at line {line} failed: "
                                 f"{type(e).__name__}: {e}") from e
