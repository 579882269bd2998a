"""The README's sample outputs are what the code prints now (scripts/readme_outputs.py; --write regenerates).

Each marked sample is one CPU run (the full quick-start run takes about 3 minutes on 2 cores, hence slow).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("readme_outputs", ROOT / "scripts" / "readme_outputs.py")
readme_outputs = importlib.util.module_from_spec(spec)
sys.modules["readme_outputs"] = readme_outputs   # a dataclass looks its module up there
spec.loader.exec_module(readme_outputs)

SAMPLES = readme_outputs.samples(readme_outputs.README.read_text())


def test_samples_are_found_with_their_commands():
    text = "intro\n<!-- output of: sandbox run --steps 2 -->\n```text\nline one\nline two\n```\nafter\n"
    (sample,) = readme_outputs.samples(text)
    assert sample.command == "sandbox run --steps 2"
    assert sample.output == "line one\nline two\n" == text[sample.start:sample.end]
    commands = [sample.command for sample in SAMPLES]
    assert "sandbox run --rule momentum_delta" in commands   # the quick start's run is among the checked ones


def test_only_speed_duration_and_time_stamp_are_ignored():
    readme = "final eval loss 0.0634, accuracy 0.9766; 11,678 tokens/s, 143.1 s\nrun folder: runs/delta-mqar-20261123-074213\n"
    now = "final eval loss 0.0634, accuracy 0.9766; 2,755 tokens/s, 75.0 s\nrun folder: runs/delta-mqar-20270101-000000-1\n"
    assert readme_outputs.normalize(readme) == readme_outputs.normalize(now)
    assert readme_outputs.normalize(readme) != readme_outputs.normalize(now.replace("0.9766", "0.9767"))
    assert readme_outputs.normalize(readme) != readme_outputs.normalize(now.replace("loss 0.0634", "loss 0.0635"))


@pytest.mark.slow
@pytest.mark.parametrize("sample", SAMPLES, ids=[sample.command for sample in SAMPLES])
def test_readme_sample_output_matches_what_the_code_prints(sample):
    printed = readme_outputs.run(sample.command)
    assert readme_outputs.normalize(printed) == readme_outputs.normalize(sample.output), (
        f"README.md's output of `{sample.command}` is out of date; regenerate it with "
        f"`python scripts/readme_outputs.py --write`.\nIt prints now:\n{printed}")
