"""`sandbox --help`, `sandbox rules`, `sandbox tasks` and the commands' help start without importing torch (the slow
part of starting up: seconds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import contextlib, io, sys
from sandbox.cli import cli_main, COMMANDS
sys.argv = ["sandbox", *sys.argv[1:]]
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        cli_main()
    except SystemExit as exit:
        code = exit.code
print(code, "torch" in sys.modules, len(out.getvalue()) > 0)
"""


@pytest.mark.parametrize("command", [["--help"], ["rules"], ["tasks"], ["compare", "--help"], ["plot", "--help"],
                                     ["ablate", "--help"], ["report", "--help"]])
def test_commands_that_only_list_or_read_folders_do_not_import_torch(command):
    done = subprocess.run([sys.executable, "-c", PROBE, *command], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    code, torch_imported, printed = done.stdout.split()
    assert code in ("0", "None") and printed == "True"
    assert torch_imported == "False"


def test_the_command_table_matches_each_command():
    import importlib

    from sandbox.cli import COMMANDS

    for name, (module, function, short_help) in COMMANDS.items():
        docstring = getattr(importlib.import_module(module), function).__doc__
        assert " ".join(docstring.split("\n\n")[0].split()).startswith(short_help.rstrip(".")), name
