"""``sandbox doctor``: what this machine offers (versions, GPU) and whether the Triton kernels run here.

Every check is guarded, so the command always finishes with a readable report, never a traceback.
"""

from __future__ import annotations

import os
import platform
import re
from typing import Callable

import torch
import typer

# Triton 3.4 up to 3.7.0 miscompiles a transpose of a tl.dot result on Hopper (fla issues 640 and 984; see
# shared notes kernels.md): the backward kernels give wrong gradients there, the forward is unaffected.
BAD_TRITON_ON_HOPPER = ((3, 4, 0), (3, 7, 1))   # [first bad, first fixed)


def parse_version(text: str) -> tuple[int, int, int] | None:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return (int(match[1]), int(match[2]), int(match[3] or 0)) if match else None


def triton_version() -> str | None:
    try:
        import triton
    except Exception:   # not installed, or broken: either way the kernels cannot run
        return None
    return triton.__version__


def hopper_miscompile_warning(triton: str | None, capability: tuple[int, int] | None) -> str | None:
    """The warning for a known-bad Triton on a compute capability 9.x GPU, or None."""
    version = parse_version(triton) if triton else None
    if version is None or capability is None or capability[0] != 9:
        return None
    first_bad, first_fixed = BAD_TRITON_ON_HOPPER
    if first_bad <= version < first_fixed:
        return (f"Triton {triton} on a Hopper GPU (compute capability {capability[0]}.{capability[1]}) miscompiles "
                "transposed tl.dot results in backward kernels (wrong gradients); use Triton >= 3.7.1 or --impl chunk")
    return None


def kernel_check(device: torch.device) -> str:
    from sandbox.layer import triton_works

    works, reason = triton_works(device)
    return f"{'ok' if works else 'FAILED'}: {reason}"


def gather() -> list[tuple[str, str]]:
    """``(label, text)`` lines of the report; a failing check becomes its own line."""
    lines: list[tuple[str, str]] = []

    def check(label: str, probe: Callable[[], str]) -> None:
        try:
            lines.append((label, probe()))
        except Exception as error:   # the report must finish whatever a probe hits
            lines.append((label, f"check failed: {type(error).__name__}: {error}"))

    triton = triton_version()
    check("python", lambda: f"{platform.python_version()} ({platform.system()} {platform.machine()})")
    check("torch", lambda: f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    check("triton", lambda: triton or "not installed (the chunk form in PyTorch works without it)")

    capability = None
    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(0)
        check("gpu", lambda: f"{torch.cuda.get_device_name(0)}, compute capability {capability[0]}.{capability[1]}, "
                             f"{torch.cuda.device_count()} visible")
        if triton:
            check("triton kernels", lambda: kernel_check(torch.device("cuda")))
    else:
        lines.append(("gpu", "none (training runs on the CPU with the chunk form)"))
        if triton and os.environ.get("TRITON_INTERPRET") == "1":
            check("triton kernels", lambda: kernel_check(torch.device("cpu")) + " (interpreter, TRITON_INTERPRET=1)")
        elif triton:
            lines.append(("triton kernels", "not run: they need a GPU, or TRITON_INTERPRET=1 to test them "
                                            "on the CPU with the (slow) interpreter"))
    warning = hopper_miscompile_warning(triton, capability)
    if warning:
        checked = dict(lines).get("triton kernels", "")
        if checked.startswith("ok"):
            warning += "; this project's kernels passed the gradient self-test above, so auto still picks them"
        lines.append(("WARNING", warning))
    check("impl auto", _auto_impl)
    return lines


def _auto_impl() -> str:
    from sandbox.layer import resolve_impl

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return f"`sandbox run` would use --impl {resolve_impl('auto', device, 64)} on {device}"


def doctor_command() -> None:
    """Report Python, torch, Triton and GPU, and whether the Triton kernels run here."""
    lines = gather()
    width = max(len(label) for label, _ in lines)
    for label, text in lines:
        typer.echo(f"{label:<{width}}  {text}")
