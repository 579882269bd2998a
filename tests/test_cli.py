"""The console entry point: parser errors become one line on stderr and exit code 2."""

import subprocess
import sys

import pytest


def sandbox(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandbox", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["run", "--no-such-flag"], "No such option: --no-such-flag"),
    (["run", "--steps", "many"], "Invalid value for '--steps'"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_parser_errors_are_one_line_with_exit_code_2(args: list, message: str) -> None:
    result = sandbox(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr and "Traceback" not in result.stderr + result.stdout


def test_no_arguments_prints_help() -> None:
    result = sandbox()
    assert result.returncode == 2 and "Commands" in result.stdout and "run" in result.stdout


def test_rules_exits_zero() -> None:
    result = sandbox("rules")
    assert result.returncode == 0 and len(result.stdout.strip().splitlines()) == 6
