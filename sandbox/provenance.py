"""Where a result came from: package version and commit, library versions, device, threads, command line.

``collect`` gathers it as one flat dict of plain values, which every ``results.json`` carries under
``"provenance"``, so that two results can be compared knowing what made them (``sandbox compare`` prints the
entries that differ). Each piece is a small function of its inputs; none raises, a value that cannot be
found is ``None``.

The commit is read from the checkout's files (``.git/HEAD`` and the refs), so it needs no ``git`` program;
whether the checkout has uncommitted changes (``dirty``) is asked of ``git status`` and is ``None`` where git
is not installed.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import sandbox

# The checkout this package was imported from, if it was imported from one (an installed wheel has no .git).
SOURCE_ROOT = Path(sandbox.__file__).resolve().parent.parent


def git_dir(root: Path) -> Path | None:
    """The git directory of the checkout at ``root``: ``root/.git``, or where a worktree's ``.git`` file points."""
    dot_git = root / ".git"
    if dot_git.is_dir():
        return dot_git
    if dot_git.is_file():
        text = dot_git.read_text().strip()
        if text.startswith("gitdir:"):
            path = Path(text.removeprefix("gitdir:").strip())
            return path if path.is_absolute() else (root / path).resolve()
    return None


def _read_ref(git: Path, ref: str) -> str | None:
    """The commit a ref (``refs/heads/main``) names: its loose file, else its line in ``packed-refs``.

    Worktrees keep their own HEAD but share refs with the main repository (named by their ``commondir``).
    """
    common = git
    if (git / "commondir").is_file():
        common = (git / (git / "commondir").read_text().strip()).resolve()
    for base in dict.fromkeys((git, common)):
        loose = base / ref
        if loose.is_file():
            return loose.read_text().strip()
        packed = base / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                commit, _, name = line.partition(" ")
                if name == ref:
                    return commit
    return None


def git_commit(root: Path) -> str | None:
    """The commit checked out at ``root`` (detached or on a branch), read from the files; None outside a checkout."""
    try:
        git = git_dir(root)
        if git is None or not (git / "HEAD").is_file():
            return None
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref:"):
            return _read_ref(git, head.removeprefix("ref:").strip())
        return head or None
    except OSError:
        return None


def git_dirty(root: Path) -> bool | None:
    """Whether tracked files at ``root`` differ from the commit (staged or not); None without git or a checkout."""
    if shutil.which("git") is None or git_dir(root) is None:
        return None
    try:
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(status.stdout.strip()) if status.returncode == 0 else None


def distribution_version(name: str) -> str | None:
    """The installed version of a package, from its metadata (without importing it: triton is slow to import)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def command_line(argv: list[str]) -> str:
    """The command as a user would retype it: ``sandbox run --steps 10`` whether started as a script or -m."""
    program = Path(argv[0]).name if argv else "sandbox"
    if program in ("sandbox", "__main__.py"):
        program = "sandbox"
    else:
        program = argv[0]
    return shlex.join([program, *argv[1:]])


def device_name(device: Any) -> str:
    """What ``device`` (a torch.device) is: the GPU's model, or the CPU's."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple GPU (mps) on {platform.machine()}"
    return cpu_name()


def collect(device: Any, argv: list[str], root: Path = SOURCE_ROOT) -> dict[str, Any]:
    """Provenance of a run on ``device`` (a torch.device) started with ``argv``, from the checkout at ``root``."""
    import torch

    return {
        "sandbox": sandbox.__version__,
        "commit": git_commit(root),
        "dirty": git_dirty(root),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": distribution_version("triton"),
        "platform": f"{platform.system()} {platform.machine()}",
        "device": device_name(device),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "command": command_line(argv),
    }
