"""``scripts/kernel_registers.py`` compiles a kernel for sm_90 without a GPU and reads its registers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not (TOOLS / "cuobjdump").exists(), reason="this Triton has no NVIDIA backend tools")
def test_kernel_registers_reads_registers_and_stack(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "scripts/kernel_registers.py", "--kernel", "backward_matrices",
                             "--rule", "linear", "--set", "BV=32"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("backward_matrices") and "BV=32" in line
    registers = int(line.split("registers=")[1].split()[0])
    assert 0 < registers <= 255
