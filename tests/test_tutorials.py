"""Every tutorial chapter runs, redraws its figures, and has its exercises solved.

A chapter is ``tutorials/NN_*.md``. Its ```python blocks end by asserting their claim against the package's
per-token loop, so a chapter that stops matching the code fails here. A ```output block placed right after a
```python block is what that block prints, and must stay exactly that (tables quoted in the prose are real).
Other fences (```text, ```bash, ...) are not run.

Figures: a chapter draws into ``$TUTORIAL_FIGURES`` (default ``tutorials/figures``). Here that is a scratch
folder, and every figure the chapter shows (``![...](figures/NAME.png)``) must have been redrawn there and look
like the committed PNG: same size, and only a few pixels different (fonts may render a little differently on
another machine; a changed curve, axis or colour map does not pass). To refresh the committed PNGs after a
deliberate change: ``TUTORIAL_REFRESH_FIGURES=1 python -m pytest tests/test_tutorials.py`` (then look at them).

Exercises: each chapter ends with a ``## Exercises`` section of 2 or 3 numbered exercises; their worked
solutions are the ``## Chapter N`` sections of ``tutorials/solutions.md``, run here like chapters.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")   # before pyplot is imported anywhere: no display in CI
from matplotlib import image as mpimg  # noqa: E402

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
FIGURES = TUTORIALS / "figures"
SOLUTIONS = TUTORIALS / "solutions.md"
CHAPTERS = sorted(TUTORIALS.glob("[0-9][0-9]_*.md"))
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
FIGURE_LINK = re.compile(r"!\[[^\]]*\]\(figures/(?P<name>[\w.-]+\.png)\)")

# A redrawn figure passes when at most this share of its pixels differs by more than PIXEL_TOLERANCE
# (in [0, 1], any channel) from the committed PNG. Moving one thin dashed line of a 10 x 4 inch plot changes 0.25%.
PIXEL_TOLERANCE = 0.25
CHANGED_SHARE = 0.002


@dataclass
class Block:
    lang: str
    body: str
    line: int  # line of the Markdown file on which the block's first code line sits


def fenced_blocks(markdown: str, first_line: int = 1) -> list[Block]:
    return [Block(m["lang"], m["body"], first_line + markdown.count("\n", 0, m.start("body")))
            for m in FENCE.finditer(markdown)]


def run_block(block: Block, path: Path, namespace: dict) -> str:
    """Execute one block and return what it printed; tracebacks point at the Markdown file's own lines."""
    source = "\n" * (block.line - 1) + block.body
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, str(path), "exec"), namespace)
    return printed.getvalue()


def run_blocks(blocks: list[Block], path: Path, name: str) -> None:
    """Run the ```python blocks in one fresh namespace, checking each ```output block against what came before."""
    assert any(b.lang == "python" for b in blocks), f"{name}: no ```python block to run"
    namespace: dict = {"__name__": f"tutorial_{name}"}
    default_dtype = torch.get_default_dtype()
    printed = None
    try:
        for block in blocks:
            if block.lang == "python":
                printed = run_block(block, path, namespace)
            elif block.lang == "output":
                assert printed is not None, f"{name}:{block.line}: ```output block without a ```python block before it"
                assert printed.strip() == block.body.strip(), (
                    f"{name}:{block.line}: the ```output block no longer matches what the code prints:\n{printed}")
                printed = None
    finally:
        torch.set_default_dtype(default_dtype)
        import matplotlib.pyplot as plt
        plt.close("all")


def figure_difference(new: Path, committed: Path) -> str | None:
    """None if ``new`` looks like ``committed``, else why not."""
    a, b = mpimg.imread(new), mpimg.imread(committed)
    if a.shape != b.shape:
        return f"size {a.shape} instead of {b.shape}"
    changed = (abs(a - b) > PIXEL_TOLERANCE).any(axis=-1).mean()
    if changed > CHANGED_SHARE:
        return f"{changed:.2%} of the pixels differ (at most {CHANGED_SHARE:.2%} allowed)"
    return None


def test_every_chapter_is_collected():
    numbers = [path.name[:2] for path in CHAPTERS]
    assert [f"{n:02d}" for n in range(1, 9)] == numbers, f"expected chapters 01..08, found {numbers}"


@pytest.mark.parametrize("path", CHAPTERS, ids=[path.name for path in CHAPTERS])
def test_chapter_runs_and_redraws_its_figures(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # whatever a chapter writes lands in a scratch folder, not in the checkout
    drawn = tmp_path / "figures"
    monkeypatch.setenv("TUTORIAL_FIGURES", str(drawn))
    markdown = path.read_text(encoding="utf-8")
    run_blocks(fenced_blocks(markdown), path, path.stem)

    shown = FIGURE_LINK.findall(markdown)
    made = sorted(p.name for p in drawn.glob("*.png")) if drawn.exists() else []
    assert sorted(set(shown)) == made, f"{path.name}: figures shown {sorted(set(shown))}, figures drawn {made}"
    for name in made:
        committed = FIGURES / name
        if os.environ.get("TUTORIAL_REFRESH_FIGURES") == "1":
            shutil.copyfile(drawn / name, committed)
        assert committed.exists(), f"{path.name}: figures/{name} is drawn but not committed"
        problem = figure_difference(drawn / name, committed)
        assert problem is None, f"{path.name}: figures/{name} redrawn differs from the committed PNG: {problem}"


def test_every_committed_figure_is_shown():
    shown = {name for path in CHAPTERS for name in FIGURE_LINK.findall(path.read_text(encoding="utf-8"))}
    committed = {p.name for p in FIGURES.glob("*.png")}
    assert committed == shown, f"committed but never shown: {sorted(committed - shown)}; " \
                               f"shown but not committed: {sorted(shown - committed)}"


def test_figure_comparison_can_fail(tmp_path: Path):
    """The comparison above is loose, not blind: a figure with one curve moved does not pass."""
    import matplotlib.pyplot as plt

    paths = []
    for shift in (0.0, 0.0, 0.3):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        x = torch.linspace(0, 6, 200)
        ax.plot(x, torch.sin(x), color="C0")
        ax.plot(x, torch.cos(x + shift), color="C1")
        paths.append(tmp_path / f"{len(paths)}.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    assert figure_difference(paths[1], paths[0]) is None
    assert figure_difference(paths[2], paths[0]) is not None


def chapter_structure(path: Path) -> tuple[str, list[str]]:
    markdown = path.read_text(encoding="utf-8")
    opening = markdown.split("\n## ", 1)[0]
    exercises = markdown.split("\n## Exercises\n", 1)
    assert len(exercises) == 2, f"{path.name}: no '## Exercises' section"
    items = re.findall(r"^(\d+)\. ", exercises[1], re.MULTILINE)
    return opening, items


@pytest.mark.parametrize("path", CHAPTERS, ids=[path.name for path in CHAPTERS])
def test_chapter_opens_with_goals_and_ends_with_exercises(path: Path):
    opening, items = chapter_structure(path)
    assert "**You will learn**" in opening and "**You need**" in opening, \
        f"{path.name}: the part before the first section must say what the reader will learn and what it assumes"
    assert 2 <= len(items) <= 3 and items == [str(i) for i in range(1, len(items) + 1)], \
        f"{path.name}: expected 2-3 numbered exercises, found {items}"
    solutions = solution_sections()
    number = int(path.name[:2])
    assert number in solutions, f"{path.name}: no '## Chapter {number}' section in tutorials/solutions.md"
    solved = re.findall(r"^### Exercise (\d+)", solutions[number][0], re.MULTILINE)
    assert solved == items, f"{path.name}: exercises {items} but solutions.md solves {solved}"


def solution_sections() -> dict[int, tuple[str, int]]:
    """Chapter number -> (its section of solutions.md, the line the section starts on)."""
    text = SOLUTIONS.read_text(encoding="utf-8")
    sections = {}
    for match in re.finditer(r"^## Chapter (\d+)\b.*?(?=^## Chapter |\Z)", text, re.MULTILINE | re.DOTALL):
        sections[int(match[1])] = (match[0], text.count("\n", 0, match.start()) + 1)
    return sections


@pytest.mark.parametrize("number", sorted(solution_sections()))
def test_solutions_run(number: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    section, first_line = solution_sections()[number]
    run_blocks(fenced_blocks(section, first_line), SOLUTIONS, f"solutions_chapter_{number}")
