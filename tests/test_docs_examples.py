"""Every ```python block in the README and the user docs runs; the API reference matches the code.

The blocks of one file run in order in one namespace (like a notebook), so a page
can build on its earlier snippets. The examples assert their own claims; a
``ConvergenceWarning`` is an error here, so an example never shows a solve that
quietly failed.

Fence info strings: ```` ```python ```` blocks run everywhere (CI has no GPU, so they
must run on a CPU, and fast: small problems, a page's blocks together in a few
seconds). ```` ```python gpu ```` marks a block that needs CUDA: it runs when
``torch.cuda.is_available()`` and is skipped otherwise. A skipped block must not
define anything a later block uses. Any other word after ``python`` is an error
(so a typo cannot silently skip or mislabel a block). Blocks in other languages
(``bash``, ``text``, no language) are not run.

Every docs page with a ```python block must be listed in ``EXAMPLE_FILES``. Relative
links of the README and every docs page must point at files (and headings) that exist.
docs/api.md must have a section for every name of ``otcore.__all__``, spell out the
full signature of every public function, constructor and method with the code's
defaults, and mention every public field and property of the classes.
"""

from __future__ import annotations

import ast
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch

import otcore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_FILES = [
    "README.md",
    "docs/getting_started.md",
    "docs/conventions.md",
    "docs/api.md",
    "docs/newton.md",
    "docs/sparse_ot.md",
    "docs/router.md",
    "docs/kernels.md",
]
LINKED_FILES = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
FENCE_TAGS = {"gpu"}  # words allowed after ```python

_BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_CODE = re.compile(r"^```.*?^```|`[^`\n]*`", re.S | re.M)  # fenced blocks and inline code: no links there


def python_blocks(text: str) -> list[tuple[int, str, set[str]]]:
    """``(line number, source, tags)`` of each ```python fenced block; ``tags`` are the
    words after ``python`` in the fence (``{"gpu"}`` for ```` ```python gpu ````)."""
    return [
        (text.count("\n", 0, m.start()) + 2, m.group(2), set(m.group(1).split()))
        for m in _BLOCK.finditer(text)
    ]


def test_block_extraction():
    text = "intro\n```python\nx = 1\n```\ntext\n```bash\nls\n```\n```python gpu\ny = 2\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n", set()), (10, "y = 2\n", {"gpu"})]


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_examples_run(name, tmp_path, monkeypatch):
    path = ROOT / name
    text = path.read_text(encoding="utf-8")
    blocks = python_blocks(text)
    assert blocks, f"{name} has no python examples"
    indented = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(r"^[ \t]+```python", text, re.M)]
    assert not indented, f"{name}: indented ```python blocks (lines {indented}) would not run; unindent them"
    for line, _, tags in blocks:
        assert tags <= FENCE_TAGS, f"{name}:{line}: unknown fence tag(s) {sorted(tags - FENCE_TAGS)}"
    monkeypatch.chdir(tmp_path)  # anything an example writes lands in a temporary folder
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_example_{path.stem}"}
    ran = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", otcore.ConvergenceWarning)
        for line, src, tags in blocks:
            if "gpu" in tags and not torch.cuda.is_available():
                continue
            code = compile(src, f"{name}:{line}", "exec")
            try:
                exec(code, namespace)
            except Exception as e:  # name the block that failed
                raise AssertionError(f"example at {name}:{line} failed: {type(e).__name__}: {e}") from e
            ran += 1
    assert ran, f"{name}: every example needs a GPU; a page needs at least one that runs on a CPU"


def test_every_page_with_examples_is_run():
    pages = ["README.md"] + [f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")]
    with_examples = {p for p in pages if python_blocks((ROOT / p).read_text(encoding="utf-8"))}
    missing = sorted(with_examples - set(EXAMPLE_FILES))
    assert not missing, f"pages with python examples not in EXAMPLE_FILES: {missing}"


def link_targets(text: str) -> list[str]:
    """Relative link targets of a Markdown text, outside code (``x[i](y)`` in code is no link)."""
    return [t for t in _LINK.findall(_CODE.sub("", text)) if not re.match(r"[a-z]+:", t)]


def test_link_targets():
    text = "[a](a.md) [`b`](#b) `f[i](j)` [w](https://x.org)\n```python\ng[e](x[s])\n```\n"
    assert link_targets(text) == ["a.md", "#b"]


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
    targets = link_targets(text)
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


# --- docs/api.md against the code -------------------------------------------------

API_TEXT = (ROOT / "docs/api.md").read_text(encoding="utf-8")


def api_section(name: str) -> str:
    """The text of docs/api.md's ``## `name` `` section, up to the next ``## `` heading."""
    m = re.search(rf"^## `(?:otcore\.)?{name}`.*?$(.*?)(?=^## |\Z)", API_TEXT, re.S | re.M)
    assert m, f"docs/api.md has no '## `{name}`' section"
    return m.group(1)


def documented_call(text: str, call: str) -> str:
    """The parameter list written after ``call(`` in ``text`` (balanced parentheses)."""
    m = re.search(rf"(?<![\w.]){re.escape(call)}\(", text)
    assert m, f"docs/api.md does not show the signature {call}(...)"
    depth, i = 1, m.end()
    while depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    return text[m.end():i - 1]


def parse_params(params: str) -> list[tuple[str, str, object]]:
    """``(name, kind, default)`` of a written parameter list such as ``x, *, eps, tol=1e-5``."""
    fn = ast.parse(f"def _({' '.join(params.split())}): pass").body[0]
    args = fn.args
    pos = args.posonlyargs + args.args
    pos_defaults = [inspect.Parameter.empty] * (len(pos) - len(args.defaults)) + list(args.defaults)
    out = [(a.arg, "positional", d) for a, d in zip(pos, pos_defaults)]
    out += [(a.arg, "keyword", inspect.Parameter.empty if d is None else d) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    evaluate = lambda d: d if d is inspect.Parameter.empty else eval(ast.unparse(d), {"slice": slice})  # noqa: E731
    return [(n, k, evaluate(d)) for n, k, d in out]


def code_params(obj) -> list[tuple[str, str, object]]:
    kinds = {inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional", inspect.Parameter.POSITIONAL_ONLY: "positional",
             inspect.Parameter.KEYWORD_ONLY: "keyword"}
    return [(p.name, kinds[p.kind], p.default) for p in inspect.signature(obj).parameters.values() if p.name != "self"]


def test_parse_params():
    assert parse_params('g, a=None, *, eps, tol=1e-5,\n  cost="l2", rows=slice(None)') == [
        ("g", "positional", inspect.Parameter.empty), ("a", "positional", None), ("eps", "keyword", inspect.Parameter.empty),
        ("tol", "keyword", 1e-5), ("cost", "keyword", "l2"), ("rows", "keyword", slice(None)),
    ]


def test_api_reference_names_every_public_symbol():
    headings = set(re.findall(r"^#+ .*?`(?:otcore\.)?([A-Za-z_]+)", API_TEXT, re.M))
    missing = [name for name in otcore.__all__ if name not in headings]
    assert not missing, f"docs/api.md has no section for {missing}"


PUBLIC_CALLABLES = [n for n in otcore.__all__ if n != "ConvergenceWarning" and n not in ("OTResult", "SparseOTResult")]


@pytest.mark.parametrize("name", PUBLIC_CALLABLES)
def test_api_reference_signatures(name):
    """``otcore.name(...)`` in its section spells out every parameter with the code's default."""
    written = parse_params(documented_call(api_section(name), f"otcore.{name}"))
    assert written == code_params(getattr(otcore, name)), f"docs/api.md's signature of otcore.{name} differs from the code"


def _public_members(cls):
    """Public methods, properties and dataclass fields defined by ``cls`` and its otcore bases."""
    members = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__.startswith("otcore"):
            members.update({k: v for k, v in vars(klass).items() if not k.startswith("_")})
    for f in getattr(cls, "__dataclass_fields__", {}):
        if not f.startswith("_"):
            members.setdefault(f, None)
    return members


API_CLASSES = ["PointCloud", "CostMatrix", "OTResult", "SparseOTResult", "SinkhornLoss", "SparseOTRouter"]
NN_MODULE_METHODS = {"forward", "extra_repr"}  # shown as calls of the module (loss_fn(...), router(...))


@pytest.mark.parametrize("name", API_CLASSES)
def test_api_reference_members(name):
    """Every public field and property is named, every public method's signature is written out."""
    cls = getattr(otcore, name)
    # the geometry primitives are documented once, under CostMatrix
    text = api_section(name) + (api_section("CostMatrix") if name == "PointCloud" else "")
    for member, value in _public_members(cls).items():
        if member in NN_MODULE_METHODS:
            continue
        if inspect.isfunction(value):
            written = parse_params(documented_call(text, member))
            assert written == code_params(value), f"docs/api.md's signature of {name}.{member} differs from the code"
        else:
            assert f"`{member}`" in text, f"docs/api.md's {name} section does not mention `{member}`"
