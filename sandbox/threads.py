"""How many CPU threads a run uses, and how its allocator keeps freed memory.

PyTorch starts one thread per core and OpenMP keeps them spinning; when other processes hold some of the
cores (a shared machine, or the parallel runs of an ablation), the threads wait on each other and a small
model trains many times slower (on 2 busy cores: 230 tokens/s with 2 threads against 2,755 with 1, the same
losses). So by default a run takes only the cores that are idle when it starts, and ``sandbox ablate
--jobs N`` gives each of its N runs an equal share of the idle cores.
"""

from __future__ import annotations

import os
from pathlib import Path


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a container's CPU quota (cgroup v2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = Path("/sys/fs/cgroup/cpu.max")
    try:
        limit, period = quota.read_text().split()[:2]
        if limit != "max":
            cores = min(cores, max(1, int(int(limit) / int(period))))
    except (OSError, ValueError):
        pass   # no cgroup v2 quota (macOS, most desktops): the affinity is the limit
    return max(1, cores)


def idle_cores(cores: int, load: float | None) -> int:
    """Cores left after the run queue's ``load`` (the 1-minute load average), at least 1."""
    if load is None:
        return cores
    return max(1, min(cores, round(cores - load)))


def threads_from_environment() -> int | None:
    """``OMP_NUM_THREADS`` when it is set to a positive integer (the user's explicit choice), else None."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def default_threads(jobs: int = 1) -> int:
    """Threads for each of ``jobs`` runs started now: OMP_NUM_THREADS if set, else the idle cores shared out."""
    chosen = threads_from_environment()
    if chosen is not None:
        return chosen
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return max(1, idle_cores(usable_cores(), load) // jobs)


def use_threads(threads: int) -> None:
    """Make this process use ``threads`` threads, and processes it starts (through OMP_NUM_THREADS) too."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def keep_freed_memory() -> bool:
    """Make glibc's allocator reuse freed large blocks instead of handing them back to the OS at once.

    A CPU training step allocates and frees a few hundred tensors of megabytes each. By default glibc serves
    such blocks with fresh pages from the OS (a page fault per 4 KiB page on first touch) and returns them on
    free, so every step pays the faults again. With the mmap threshold at its maximum (32 MiB) and a trim
    threshold of 256 MiB they come from the reused heap: 5-14% less time per default training step on a
    shared 2-core CPU (about 5,100 page faults a step before, none after; BENCHMARKS.md, issue 12). Returns
    whether it applied: only where the C library is glibc (Linux), elsewhere it does nothing.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):   # no glibc: macOS, Windows, musl
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 256 << 20))
