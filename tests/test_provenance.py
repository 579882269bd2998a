"""Provenance: the commit read from a checkout's files (loose, packed, detached, worktree), the dirty flag,
versions, threads and the command line."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sandbox import __version__
from sandbox.provenance import collect, command_line, git_commit, git_dirty

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git program to build a checkout")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True,
                          env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                               "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}).stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "a.txt").write_text("one\n")
    git(root, "add", "a.txt")
    git(root, "commit", "-q", "-m", "first")
    (root / "a.txt").write_text("two\n")
    git(root, "commit", "-q", "-am", "second")
    return root


@needs_git
def test_commit_is_read_from_the_files_as_git_would_say(checkout):
    head = git(checkout, "rev-parse", "HEAD")
    assert git_commit(checkout) == head                       # loose ref refs/heads/main
    git(checkout, "pack-refs", "--all")
    assert not (checkout / ".git" / "refs" / "heads" / "main").exists()
    assert git_commit(checkout) == head                       # from packed-refs
    first = git(checkout, "rev-parse", "HEAD~1")
    git(checkout, "checkout", "-q", "--detach", first)
    assert git_commit(checkout) == first                      # detached HEAD


@needs_git
def test_commit_of_a_worktree_whose_dot_git_is_a_file(checkout, tmp_path):
    git(checkout, "branch", "side", "HEAD~1")
    worktree = tmp_path / "side"
    git(checkout, "worktree", "add", "-q", str(worktree), "side")
    assert (worktree / ".git").is_file()
    assert git_commit(worktree) == git(checkout, "rev-parse", "side") != git_commit(checkout)


@needs_git
def test_dirty_means_tracked_changes_staged_or_not(checkout):
    assert git_dirty(checkout) is False
    (checkout / "new.txt").write_text("untracked files do not count\n")
    assert git_dirty(checkout) is False
    (checkout / "a.txt").write_text("edited\n")
    assert git_dirty(checkout) is True
    git(checkout, "add", "a.txt")
    assert git_dirty(checkout) is True


def test_outside_a_checkout_commit_and_dirty_are_unknown(tmp_path):
    assert git_commit(tmp_path) is None
    assert git_dirty(tmp_path) is None


@needs_git
def test_without_the_git_program_the_commit_is_still_known(checkout, monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert shutil.which("git") is None
    assert git_commit(checkout) is not None
    assert git_dirty(checkout) is None


def test_command_line_is_what_a_user_retypes():
    assert command_line(["/venv/bin/sandbox", "run", "--out", "my runs/a"]) == "sandbox run --out 'my runs/a'"
    assert command_line(["/src/sandbox/__main__.py", "ablate", "r.toml"]) == "sandbox ablate r.toml"
    assert command_line(["script.py", "--x"]) == "script.py --x"


def test_collect_names_versions_device_and_threads(tmp_path):
    record = collect(torch.device("cpu"), ["sandbox", "run"], root=tmp_path)
    assert record["sandbox"] == __version__ and record["torch"] == torch.__version__
    assert record["threads"] == torch.get_num_threads() and record["cpu_cores"] >= 1
    assert record["command"] == "sandbox run" and record["commit"] is None
    assert record["python"].count(".") == 2 and record["device"]
    assert {"cuda", "triton", "dirty", "platform"} <= record.keys()
