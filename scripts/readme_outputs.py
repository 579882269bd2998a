"""Check, or rewrite, the sample outputs in README.md against what the code prints now.

    python scripts/readme_outputs.py            # run every marked command, report the blocks that differ
    python scripts/readme_outputs.py --write    # run them and write their output into README.md
    python scripts/readme_outputs.py --only "--steps 60"    # only the samples whose command contains this

A sample output is a ```text block right after a marker line naming its command:

    <!-- output of: sandbox run --steps 60 --seq-len 32 -->

The commands run on the CPU in a scratch folder, one thread each (the losses do not depend on the thread
count; the speed does). Speeds, times and the time stamp in the run folder's name change from run to run and
machine to machine; the comparison ignores them (``normalize``), the rest must match line for line. The CPU
runs are deterministic, so a difference means the code now trains differently and the README must be
regenerated (``--write``). ``tests/test_readme_outputs.py`` runs the check.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- output of: (?P<command>sandbox .+?) -->\n```text\n(?P<output>.*?)```\n", re.S | re.M)


@dataclass
class Sample:
    command: str        # as written in the README, starting with "sandbox"
    output: str         # the block's text
    start: int          # character span of the block's text in the README
    end: int


def samples(text: str) -> list[Sample]:
    """The marked sample outputs of a README text, in order."""
    return [Sample(m["command"], m["output"], m.start("output"), m.end("output")) for m in MARKER.finditer(text)]


def normalize(output: str) -> list[str]:
    """The lines of an output without what varies between identical runs: speed, durations, time stamps."""
    lines = []
    for line in output.strip().splitlines():
        line = re.sub(r"[\d,]+ tokens/s, [\d.]+ s", "N tokens/s, T s", line)
        line = re.sub(r"-\d{8}-\d{6}(-\d+)?\b", "-TIME", line)
        lines.append(line.rstrip())
    return lines


def run(command: str) -> str:
    """The stdout of a README command, run with this checkout's package in a scratch folder, one thread."""
    arguments = shlex.split(command)
    assert arguments[0] == "sandbox", command
    environment = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as scratch:
        process = subprocess.run([sys.executable, "-m", "sandbox", *arguments[1:]], cwd=scratch, env=environment,
                                 capture_output=True, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"`{command}` exited with {process.returncode}: {process.stderr.strip()[-2000:]}")
    return process.stdout


def differences(text: str, only: str = "") -> list[tuple[Sample, str]]:
    """The samples (whose command contains ``only``) that no longer match, each with what it prints now."""
    found = []
    for sample in samples(text):
        if only not in sample.command:
            continue
        printed = run(sample.command)
        if normalize(printed) != normalize(sample.output):
            found.append((sample, printed))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the current outputs into README.md")
    parser.add_argument("--only", default="", help="only the samples whose command contains this text")
    args = parser.parse_args()
    text = README.read_text()
    changed = differences(text, args.only)
    for sample, printed in changed:
        print(f"--- {sample.command}: README says\n{sample.output}+++ it prints now\n{printed}")
    if args.write and changed:
        for sample, printed in sorted(changed, key=lambda pair: -pair[0].start):   # from the end: spans stay valid
            text = text[:sample.start] + printed.rstrip("\n") + "\n" + text[sample.end:]
        README.write_text(text)
        print(f"rewrote {len(changed)} sample output(s) in {README}")
    print(f"{len(samples(text))} sample output(s), {len(changed)} differ")
    return 1 if changed and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
