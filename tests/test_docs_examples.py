"""Every ```python block in the README and the user docs runs, on the CPU.

The blocks of one file run in order in one namespace (like a notebook), so a page
can build on its earlier snippets. The examples assert their own claims; a
``ConvergenceWarning`` is an error here, so an example never shows a solve that
quietly failed. Relative links of these pages must point at files that exist, and
docs/api.md must document every public name.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import otcore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_FILES = ["README.md", "docs/getting_started.md", "docs/conventions.md", "docs/api.md"]
LINKED_FILES = EXAMPLE_FILES + ["docs/index.md", "docs/cli.md"]

_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, source)`` of each ```python fenced block."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in _BLOCK.finditer(text)]


def test_block_extraction():
    text = "intro\n```python\nx = 1\n```\ntext\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (10, "y = 2\n")]


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_examples_run(name, tmp_path, monkeypatch):
    path = ROOT / name
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    assert blocks, f"{name} has no python examples"
    monkeypatch.chdir(tmp_path)  # anything an example writes lands in a temporary folder
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_example_{path.stem}"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", otcore.ConvergenceWarning)
        for line, src in blocks:
            code = compile(src, f"{name}:{line}", "exec")
            try:
                exec(code, namespace)
            except Exception as e:  # name the block that failed
                raise AssertionError(f"example at {name}:{line} failed: {type(e).__name__}: {e}") from e


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped,
    spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_heading_anchors():
    assert heading_anchors("# A\n## Gradients: what is exact\n### `sinkhorn_newton`\n") == {
        "a", "gradients-what-is-exact", "sinkhorn_newton"
    }


@pytest.mark.parametrize("name", LINKED_FILES)
def test_relative_links_exist(name):
    path = ROOT / name
    text = path.read_text(encoding="utf-8")
    targets = [t for t in _LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    assert targets, f"{name} links to nothing"
    missing, bad_anchor = [], []
    for t in targets:
        file, _, anchor = t.partition("#")
        target = path.parent / file if file else path
        if not target.exists():
            missing.append(t)
        elif anchor and anchor not in heading_anchors(target.read_text(encoding="utf-8")):
            bad_anchor.append(t)
    assert not missing, f"{name} links to missing files: {missing}"
    assert not bad_anchor, f"{name} links to missing headings: {bad_anchor}"


def test_api_reference_names_every_public_symbol():
    text = (ROOT / "docs/api.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#+ .*?`(?:otcore\.)?([A-Za-z_]+)", text, re.M))
    missing = [name for name in otcore.__all__ if name not in headings]
    assert not missing, f"docs/api.md has no section for {missing}"
