"""Thread counts: idle cores by default, shared among an ablation's jobs, OMP_NUM_THREADS and --threads win."""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

from sandbox import threads
from sandbox.cli import app


@pytest.mark.parametrize("cores, load, idle", [(4, None, 4), (4, 0.2, 4), (4, 1.2, 3), (2, 6.0, 1), (8, 0.0, 8)])
def test_idle_cores_leave_the_busy_ones(cores, load, idle):
    assert threads.idle_cores(cores, load) == idle


def test_default_threads_share_the_idle_cores_among_jobs(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 0.0, 0.0))
    assert threads.default_threads() == 6
    assert threads.default_threads(jobs=3) == 2
    assert threads.default_threads(jobs=10) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")   # the user's explicit choice
    assert threads.default_threads(jobs=4) == 3


def test_usable_cores_is_within_what_the_machine_has():
    assert 1 <= threads.usable_cores() <= (os.cpu_count() or 1)


def test_use_threads_sets_torch_and_the_children_environment(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        threads.use_threads(1)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_run_rejects_a_thread_count_below_one(tmp_path):
    result = CliRunner().invoke(app, ["run", "--threads", "0", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "threads: expected a positive integer" in result.output
    assert not (tmp_path / "run").exists()


def test_keep_freed_memory_applies_on_glibc_only():
    import platform

    applied = threads.keep_freed_memory()
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
