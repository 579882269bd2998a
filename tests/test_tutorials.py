"""Every tutorial chapter runs: its ```python blocks, in order, in one namespace per chapter.

A chapter is ``tutorials/NN_*.md``. Its ```python blocks end by asserting their claim against the package's
per-token loop, so a chapter that stops matching the code fails here. A ```output block placed right after a
```python block is what that block prints, and must stay exactly that (tables quoted in the prose are real).
Other fences (```text, ```bash, ...) are not run.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
CHAPTERS = sorted(TUTORIALS.glob("[0-9][0-9]_*.md"))
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass
class Block:
    lang: str
    body: str
    line: int  # line of the Markdown file on which the block's first code line sits


def fenced_blocks(markdown: str) -> list[Block]:
    return [Block(m["lang"], m["body"], markdown.count("\n", 0, m.start("body")) + 1)
            for m in FENCE.finditer(markdown)]


def run_block(block: Block, path: Path, namespace: dict) -> str:
    """Execute one block and return what it printed; tracebacks point at the Markdown file's own lines."""
    source = "\n" * (block.line - 1) + block.body
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, str(path), "exec"), namespace)
    return printed.getvalue()


def test_every_chapter_is_collected():
    numbers = [path.name[:2] for path in CHAPTERS]
    assert [f"{n:02d}" for n in range(1, 7)] == numbers[:6], f"expected chapters 01..06 first, found {numbers}"


@pytest.mark.parametrize("path", CHAPTERS, ids=[path.name for path in CHAPTERS])
def test_chapter_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # whatever a chapter writes lands in a scratch folder, not in the checkout
    blocks = fenced_blocks(path.read_text(encoding="utf-8"))
    assert any(b.lang == "python" for b in blocks), f"{path.name}: no ```python block to run"
    namespace: dict = {"__name__": f"tutorial_{path.stem}"}
    default_dtype = torch.get_default_dtype()
    printed = None
    try:
        for block in blocks:
            if block.lang == "python":
                printed = run_block(block, path, namespace)
            elif block.lang == "output":
                assert printed is not None, f"{path.name}:{block.line}: ```output block without a ```python block before it"
                assert printed.strip() == block.body.strip(), (
                    f"{path.name}:{block.line}: the ```output block no longer matches what the code prints:\n{printed}")
                printed = None
    finally:
        torch.set_default_dtype(default_dtype)
