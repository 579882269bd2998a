"""Without Triton (macOS, Windows, or a Linux install without it) every CPU path works and ``rule.triton`` and
``--impl triton`` say in one line what is missing.

The test runs a fresh interpreter in which importing ``triton`` fails as it does where it is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BLOCK_TRITON = """
import sys

class NoTriton:
    '''Makes `import triton` fail as it does where the package is not installed.'''
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTriton())
"""

SCRIPT = """
import contextlib, io, json, sys
import torch
import sandbox
from sandbox.cli import cli_main
from sandbox.rules import get_rule

folder = sys.argv[1]
outcome = {"triton_imported": False}
rule = get_rule("gated_delta")
q, k, v = torch.randn(1, 20, 2, 8), torch.nn.functional.normalize(torch.randn(1, 20, 2, 8), dim=-1), torch.randn(1, 20, 2, 8)
gates = dict(log_alpha=-torch.rand(1, 20, 2) * 0.1, beta=torch.rand(1, 20, 2))
outcome["chunk_matches_loop"] = torch.allclose(rule.chunk(q, k, v, chunk_size=8, **gates)[0],
                                               rule.naive(q, k, v, **gates)[0], atol=1e-5)
try:
    rule.triton(q, k, v, **gates)
except ModuleNotFoundError as error:
    outcome["rule_triton_error"] = str(error)


def cli(*args):
    stdout, stderr = io.StringIO(), io.StringIO()
    sys.argv = ["sandbox", *args]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            cli_main()
        except SystemExit as exit:
            code = exit.code
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


tiny = ["--steps", "2", "--d-model", "16", "--heads", "2", "--layers", "1", "--batch-size", "4",
        "--eval-every", "2", "--eval-batches", "1", "--log-every", "1", "--device", "cpu"]
outcome["run_triton"] = cli("run", *tiny, "--impl", "triton", "--out", folder + "/triton")
outcome["run"] = cli("run", *tiny, "--out", folder + "/run")
outcome["doctor"] = cli("doctor")
outcome["bench"] = cli("bench", "--shape", "1,16,2,8", "--rule", "delta", "--impl", "chunk", "--impl", "triton",
                       "--dtype", "float32", "--device", "cpu", "--repeats", "1", "--out", folder + "/bench.json")
outcome["triton_imported"] = "triton" in sys.modules
print(json.dumps(outcome))
"""


def test_every_cpu_path_works_without_triton(tmp_path):
    code = BLOCK_TRITON + textwrap.dedent(SCRIPT)
    process = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                             cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                "TRITON_INTERPRET": "1"}, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    outcome = json.loads(process.stdout.splitlines()[-1])
    assert not outcome["triton_imported"]
    assert outcome["chunk_matches_loop"]
    assert outcome["rule_triton_error"].startswith("rule.triton: the triton package is not installed")

    run_triton = outcome["run_triton"]
    assert run_triton["code"] == 2
    assert run_triton["stderr"].count("\n") == 1 and "error: impl: the triton package is not installed" in run_triton["stderr"]
    assert not (tmp_path / "triton").exists()

    assert outcome["run"]["code"] == 0, outcome["run"]["stderr"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["impl"] == "chunk"

    doctor = outcome["doctor"]
    assert doctor["code"] == 0 and "not installed" in doctor["stdout"]

    assert outcome["bench"]["code"] == 0, outcome["bench"]["stderr"]
    cases = {case["impl"]: case for case in json.loads((tmp_path / "bench.json").read_text())["results"]}
    assert cases["chunk"]["status"] == "ok"
    assert cases["triton"]["status"] == "skipped" and "not installed" in cases["triton"]["note"]
