"""Fault injection on run folders and ablation folders: concurrent writers, killed parents, torn and damaged
files, a full disk, edited configs, user files in the way, and the user mistakes that must be one line.

Each test names the finding of issue 11 it checks. Runs are tiny (a few steps of a 16-wide model on CPU).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sandbox.runfolder as runfolder
from sandbox.cli import app
from sandbox.config import load_config
from sandbox.runfolder import RunFolder, is_locked, write_plan, write_text_atomically

TINY_MODEL = ["--d-model", "16", "--layers", "1", "--heads", "2", "--batch-size", "8", "--steps", "6", "--chunk-size",
              "16", "--eval-every", "3", "--eval-batches", "1", "--log-every", "2", "--checkpoint-every", "3",
              "--device", "cpu", "--rule", "delta"]
TINY = ["--task", "mqar", "--task-arg", "vocab_size=16", "--task-arg", "seq_len=16", "--task-arg", "num_kv_pairs=2",
        *TINY_MODEL]
TINY_RECIPE = """
seeds = [0]
[base]
task = "mqar"
seq_len = 16
d_model = 8
layers = 1
heads = 1
steps = {steps}
batch_size = 4
warmup_steps = 1
eval_every = {steps}
eval_batches = 1
log_every = 1000
checkpoint_every = {steps}
device = "cpu"
impl = "chunk"
chunk_size = 8
[base.task_args]
vocab_size = 16
num_kv_pairs = 2
[grid]
rule = ["delta"]
"""
RUN_NAME = "rule=delta__seed=0"


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, code: int = 2) -> str:
    """The single ``error:`` line of a failed command (progress bars aside), checking the exit code."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def tiny_run(out: Path, *extra: str) -> Path:
    result = invoke("run", *TINY, "--out", out, *extra)
    assert result.exit_code == 0, result.output
    return out


def sandbox_process(*args: object, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sandbox", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie waiting to be reaped counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def lock_holder(folder: Path) -> int | None:
    text = (folder / runfolder.LOCK).read_text().strip() if (folder / runfolder.LOCK).is_file() else ""
    return int(text) if text.isdigit() else None


# --- finding 1: one trainer per folder; ablation runs end with the ablation ---------------------------

def test_resume_of_a_folder_another_trainer_holds_is_refused(tmp_path):
    folder = tiny_run(tmp_path / "r")
    with RunFolder.open(folder):   # as a trainer would hold it
        line = one_line_error(invoke("run", "--resume", folder, "--steps", "8"))
    assert line.startswith("error: resume:") and "in use" in line and str(os.getpid()) in line
    before = (folder / "metrics.jsonl").read_text()
    assert invoke("run", "--resume", folder, "--steps", "8").exit_code == 0   # the lock went with its holder
    assert (folder / "metrics.jsonl").read_text().startswith(before)


def test_two_resumes_started_together_one_trains_one_is_refused(tmp_path):
    folder = tiny_run(tmp_path / "r")
    processes = [sandbox_process("run", "--resume", folder, "--steps", "100000") for _ in range(2)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in processes), 120, "one resume to be refused")
        refused = next(p for p in processes if p.poll() is not None)
        output = refused.stdout.read()
        assert refused.returncode == 2 and "in use" in output and "Traceback" not in output, output
        training = next(p for p in processes if p is not refused)
        assert training.poll() is None and lock_holder(folder) == training.pid
    finally:
        for process in processes:
            process.kill()
            process.wait()
    keys = [(r["step"], r["split"]) for r in runfolder.read_metrics(folder)]   # the killed one may leave a torn line
    assert len(keys) == len(set(keys)) and keys == sorted(keys, key=lambda k: k[0])


def test_killing_the_ablation_parent_kills_its_training_run(tmp_path):
    recipe = tmp_path / "slow.toml"
    recipe.write_text(TINY_RECIPE.format(steps=1_000_000))
    out = tmp_path / "ablation"
    parent = sandbox_process("ablate", recipe, "--out", out)
    folder = out / "runs" / RUN_NAME
    try:
        wait_for(lambda: lock_holder(folder) is not None or parent.poll() is not None, 120, "the run to start")
        assert parent.poll() is None, parent.stdout.read()
        child = lock_holder(folder)
        assert child != parent.pid and alive(child)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    wait_for(lambda: not alive(child), 30, f"the orphaned run (pid {child}) to end")
    # The main thread can show as a zombie while the process's other threads still close its files: the lock
    # is released a moment later, so wait for that too rather than test it at once.
    wait_for(lambda: not is_locked(folder) and not is_locked(out), 30, "the run's and the ablation's locks to go")
    # The ablation's own lock went with it too: a rerun is not refused (a dry run is enough to show it).
    assert invoke("ablate", recipe, "--out", out, "--dry-run").exit_code == 0


def test_a_run_whose_ablation_is_already_gone_stops(tmp_path):
    """The watchdog (macOS has no parent-death signal): a run told that its ablation has another pid stops."""
    env = dict(os.environ, SANDBOX_ABLATE_PID=str(os.getpid() + 10**6))
    process = sandbox_process("run", *TINY, "--steps", "1000000", "--out", tmp_path / "r", env=env)
    try:
        process.wait(timeout=120)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGTERM


def test_a_second_ablation_in_the_same_folder_is_refused(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(steps=4))
    out = tmp_path / "ablation"
    out.mkdir()
    holder = runfolder.FolderLock(out, "--out", "running an ablation in")
    try:
        line = one_line_error(invoke("ablate", recipe, "--out", out))
    finally:
        holder.release()
    assert line.startswith("error: --out:") and "in use" in line
    assert list(out.iterdir()) == [out / runfolder.LOCK]


# --- finding 2: user files are never overwritten ------------------------------------------------------

def test_ablate_refuses_a_folder_that_is_not_an_ablation_of_its_recipe(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(steps=4))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.md").write_text("my notes")
    (mine / "summary.csv").write_text("my,table\n")
    line = one_line_error(invoke("ablate", recipe, "--out", mine))
    assert "--out" in line and "not empty" in line
    assert sorted(p.name for p in mine.iterdir()) == ["summary.csv", "summary.md"]
    assert (mine / "summary.md").read_text() == "my notes"

    other = tmp_path / "other"
    other.mkdir()
    write_plan(other, {"recipe": "another", "runs": []})
    assert "holds the ablation 'another'" in one_line_error(invoke("ablate", recipe, "--out", other))


def test_report_replaces_only_summaries_it_wrote(tmp_path):
    runs = tmp_path / "runs"
    tiny_run(runs / "a")
    tiny_run(runs / "b", "--lr", "0.01")
    (runs / "summary.md").write_text("my notes")
    line = one_line_error(invoke("report", runs))
    assert "summary.md" in line and "not written by `sandbox report`" in line
    assert (runs / "summary.md").read_text() == "my notes" and not (runs / "summary.csv").exists()

    (runs / "summary.md").unlink()
    assert invoke("report", runs).exit_code == 0
    assert invoke("report", runs).exit_code == 0   # its own files it replaces
    with open(runs / "summary.csv", "a") as f:
        f.write("my extra row\n")
    assert "summary.csv" in one_line_error(invoke("report", runs))
    assert (runs / "summary.csv").read_text().endswith("my extra row\n")


# --- finding 3: atomic files, torn and damaged files ------------------------------------------------------

def test_torn_last_metrics_line_is_dropped_with_a_warning_and_resume_works(tmp_path):
    folder = tiny_run(tmp_path / "r")
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "split": "tr')   # a writer killed mid-line
    result = invoke("run", "--resume", folder, "--steps", "8")
    assert result.exit_code == 0, result.output
    assert "dropped a torn last line" in result.stderr and str(folder / "metrics.jsonl") in result.stderr
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "valid"] == [3, 6, 8]


def test_damaged_metrics_line_in_the_middle_names_the_file_and_line(tmp_path):
    folder = tiny_run(tmp_path / "r")
    lines = (folder / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = "garbage\n"
    (folder / "metrics.jsonl").write_text("".join(lines))
    line = one_line_error(invoke("run", "--resume", folder, "--steps", "8"))
    assert str(folder / "metrics.jsonl") in line and "line 2" in line and "delete that line" in line


def test_empty_results_json_is_named_by_report_compare_and_ablate(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(steps=4))
    out = tmp_path / "ablation"
    assert invoke("ablate", recipe, "--out", out).exit_code == 0
    folder = out / "runs" / RUN_NAME
    results = folder / "results.json"
    results.write_text("")
    for args in (["report", out], ["compare", folder, folder], ["ablate", recipe, "--out", out]):
        line = one_line_error(invoke(*args))
        assert str(results) in line and "is empty" in line and f"sandbox run --resume {folder}" in line, args
    # What the message says to do works: the run writes its results again from its final checkpoint.
    results.unlink()
    assert invoke("run", "--resume", folder).exit_code == 0
    assert json.loads(results.read_text())["steps"] == 4


def test_a_failing_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("previous")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runfolder.os, "fsync", full_disk)
    with pytest.raises(ValueError, match=f"cannot write {path} .No space left on device.; the previous version is kept"):
        write_text_atomically(path, "new")
    assert path.read_text() == "previous" and sorted(tmp_path.iterdir()) == [path]


# --- finding 6: a full disk during a checkpoint; a checkpoint without a key --------------------------------

def test_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    original, saves = torch.save, []

    def save_until_the_disk_is_full(state, f):
        saves.append(state["step"])
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(state, f)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)   # runfolder imports torch when saving
    folder = tmp_path / "r"
    line = one_line_error(invoke("run", *TINY, "--out", folder))
    assert line.startswith("error: checkpoint: cannot write") and str(folder / "checkpoint.pt") in line
    assert "No space left on device" in line and f"sandbox run --resume {folder}" in line
    assert not list(folder.glob("*.partial")) and not list(folder.glob("*.tmp"))
    monkeypatch.undo()
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["step"] == 3
    assert invoke("run", "--resume", folder).exit_code == 0


def test_checkpoint_without_a_key_is_one_line(tmp_path):
    folder = tiny_run(tmp_path / "r")
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, folder / "checkpoint.pt")
    line = one_line_error(invoke("run", "--resume", folder, "--steps", "8"))
    assert "lacks 'optimizer'" in line and str(folder / "checkpoint.pt") in line


# --- finding 4: resume checks config.toml against the checkpoint ----------------------------------------

@pytest.mark.parametrize("edit, named", [
    (("lr = 0.005", "lr = 0.01"), "lr (checkpoint 0.005, config.toml 0.01)"),
    (("num_kv_pairs = 2", "num_kv_pairs = 3"), "task_args.num_kv_pairs (checkpoint 2, config.toml 3)"),
])
def test_resume_refuses_a_config_edited_since_the_checkpoint(tmp_path, edit, named):
    folder = tiny_run(tmp_path / "r")
    config = folder / "config.toml"
    assert edit[0] in config.read_text()
    config.write_text(config.read_text().replace(*edit))
    line = one_line_error(invoke("run", "--resume", folder, "--steps", "8"))
    assert named in line and "config.toml" in line
    config.write_text(config.read_text().replace(edit[1], edit[0]))
    config.write_text(config.read_text().replace("steps = 6", "steps = 7"))   # steps may change
    assert invoke("run", "--resume", folder).exit_code == 0


# --- finding 5: config reuse goes elsewhere; report reads the plan's runs only ---------------------------

def test_reusing_an_ablation_runs_config_neither_writes_into_nor_joins_the_ablation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(steps=4))
    out = tmp_path / "ablation"
    assert invoke("ablate", recipe, "--out", out).exit_code == 0
    run = out / "runs" / RUN_NAME
    assert "out =" not in (run / "config.toml").read_text()
    summary = (out / "summary.md").read_text()

    # A config.toml of an older version still names its folder: reusing it must not write next to it.
    (run / "config.toml").write_text(f'out = "{run}"\n' + (run / "config.toml").read_text())
    for _ in range(2):
        result = invoke("run", "--config", run / "config.toml", "--steps", "2")
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "runs").iterdir()) == [RUN_NAME]
    assert len(list((tmp_path / "runs").iterdir())) == 2

    # Even a finished run folder placed next to the plan's own is not the ablation's.
    stray = out / "runs" / f"{RUN_NAME}-1"
    tiny_run(stray, "--steps", "2")
    assert invoke("report", out).exit_code == 0
    assert (out / "summary.md").read_text() == summary
    assert invoke("ablate", recipe, "--out", out).exit_code == 0


# --- findings 6-9: one line naming the argument, exit 2, nothing created -----------------------------------

@pytest.mark.parametrize("args, named", [
    (["--d-model", "100000000", "--heads", "1"], "d_model"),
    (["--task-arg", "vocab_size=10000000000"], "vocab_size"),
    (["--batch-size", "1000000000"], "batch_size"),
    (["--seq-len", "1000000000", "--task-arg", "seq_len=1000000000"], "seq_len"),
    (["--seed", "99999999999999999999999"], "seed"),
    (["--seed", "-1"], "seed"),
    (["--lr", "inf"], "lr"),
    (["--weight-decay", "nan"], "weight_decay"),
    (["--grad-clip", "inf"], "grad_clip"),
    (["--min-log-mu", "-inf"], "min_log_mu"),
    (["--out", "/"], "out"),
    (["--out", "a_file/run"], "out"),
    (["--config", "binary.toml"], "config"),
    (["--config", "."], "config"),
    (["--task", "text", "--task-arg", "data=empty.txt"], "data"),
])
def test_run_mistakes_are_one_line_naming_the_argument_and_create_nothing(tmp_path, monkeypatch, args, named):
    monkeypatch.chdir(tmp_path)
    Path("a_file").write_text("")
    Path("empty.txt").write_text("")
    Path("binary.toml").write_bytes(bytes(range(256)))
    base = TINY_MODEL if "--task" in args else TINY   # the text task has no vocab_size or num_kv_pairs
    line = one_line_error(invoke("run", *base, *args))
    assert line.startswith(f"error: {named}") or f"'{named}'" in line.split(":")[1], line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "binary.toml", "empty.txt"]


def test_bench_out_unwritable_and_inputs_out_of_memory(tmp_path, monkeypatch):
    import sandbox.bench as bench

    tiny = ["bench", "--shape", "2,40,2,8", "--dtype", "float32", "--device", "cpu", "--repeats", "1",
            "--rule", "linear", "--impl", "chunk", "--no-backward"]
    line = one_line_error(invoke(*tiny, "--out", "/proc/sandbox-bench.json"))
    assert line.startswith("error: --out: cannot create /proc/sandbox-bench.json")

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 TB")

    monkeypatch.setattr(bench, "random_inputs", no_memory)
    out = tmp_path / "bench.json"
    result = invoke(*tiny, "--out", out)
    assert result.exit_code == 0, result.output
    (case,) = json.loads(out.read_text())["results"]
    assert case["status"] == "failed" and "can't allocate memory" in case["note"]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "run_case", crash)   # cut short before any case: the file is valid JSON
    invoke(*tiny, "--out", tmp_path / "cut.json")
    assert json.loads((tmp_path / "cut.json").read_text())["results"] == []


@pytest.mark.parametrize("recipe_text, named", [
    ('[base]\nbatch_size = "64"\n[grid]\nrule = ["delta"]\n', "base.batch_size: expected int, got '64'"),
    ('[base]\nshort_conv = 1\n[grid]\nrule = ["delta"]\n', "base.short_conv: expected bool"),
    ('[grid]\nrule = ["delta"]\nlr = [0.1, "fast"]\n', "grid.lr: expected float, got 'fast'"),
    (None, "recipe: "),   # a binary file
    ("folder", "recipe: "),
])
def test_recipe_mistakes_are_one_line_even_in_a_dry_run(tmp_path, recipe_text, named):
    recipe = tmp_path / "r.toml"
    if recipe_text is None:
        recipe.write_bytes(bytes(range(256)))
    elif recipe_text == "folder":
        recipe.mkdir()
    else:
        recipe.write_text(recipe_text)
    for extra in (["--dry-run"], []):
        line = one_line_error(invoke("ablate", recipe, "--out", tmp_path / "out", *extra))
        assert line.startswith(f"error: {named}"), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["a_file", "a_file/sub", "/proc/sandbox-ablation"])
def test_ablate_out_that_cannot_be_a_folder_is_one_line(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    Path("a_file").write_text("mine")
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(steps=4))
    line = one_line_error(invoke("ablate", recipe, "--out", where))
    assert line.startswith("error: --out:")
    assert Path("a_file").read_text() == "mine"


def test_saved_config_does_not_carry_its_folder(tmp_path):
    folder = tiny_run(tmp_path / "r")
    assert "out" not in load_config(folder / "config.toml")


def test_a_run_stopped_before_its_first_checkpoint_is_set_aside_not_suffixed(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(steps=4))
    out = tmp_path / "ablation"
    out.mkdir()
    write_plan(out, {"recipe": "tiny", "runs": []})
    stale = out / "runs" / RUN_NAME
    stale.mkdir(parents=True)
    (stale / "config.toml").write_text('rule = "delta"\n')
    (stale / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.7}\n')
    assert invoke("ablate", recipe, "--out", out).exit_code == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == [RUN_NAME]   # no rule=delta__seed=0-1
    assert json.loads((stale / "results.json").read_text())["steps"] == 4
    assert (out / "incomplete" / RUN_NAME / "metrics.jsonl").read_text().startswith('{"step": 1')


def test_damaged_config_toml_of_a_run_names_the_file_and_what_to_do(tmp_path):
    folder = tiny_run(tmp_path / "r")
    (folder / "config.toml").write_text('rule = "delta\n')
    for args in (["run", "--resume", folder], ["compare", folder, folder]):
        line = one_line_error(invoke(*args))
        assert str(folder / "config.toml") in line and "repair that file" in line, args
