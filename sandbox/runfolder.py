"""Run folders and ablation folders on disk: the one module that knows their files and how to write them.

A run folder (``sandbox run``) holds
    config.toml      the resolved config: what to train, never where (the folder is where); ``--config`` reuses it
    metrics.jsonl    one JSON object per logged train step and per evaluation, appended line by line
    results.json     the summary at the end (final valid and test loss and metric, size, speed)
    checkpoint.pt    model, optimizer, step, the RNG states and the resolved config
    events.out.*     TensorBoard events (written by TensorBoard's own writer)
    .lock            held (``flock``) by the one trainer writing the folder, for as long as it runs

An ablation folder (``sandbox ablate``) holds ``plan.json`` (the runs its recipe expands to), ``configs/``,
``logs/``, ``runs/NAME/`` (one run folder per planned run, exactly that name), ``summary.csv``, ``summary.md``,
``summary.png``, ``summaries.json`` (the fingerprints of the summaries ``sandbox report`` wrote, so that it
never replaces a file somebody else wrote or edited) and its own ``.lock`` while ``sandbox ablate`` runs.

Every file a reader parses is replaced atomically (a temporary file in the same folder, flushed to disk, then
renamed over the old one), so a crash or a full disk leaves the previous version, never half a file. The one
exception is ``metrics.jsonl``, which grows a line at a time: its readers drop a torn last line and say so.

Locks use ``fcntl.flock`` (Linux, macOS) or ``msvcrt.locking`` (Windows). The operating system releases them
when the process ends, however it ends, so a killed trainer never leaves a folder locked.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

from sandbox.config import RunConfig, config_to_toml, flatten, load_config

if TYPE_CHECKING:
    import torch

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
PLAN = "plan.json"
SUMMARY_FINGERPRINTS = "summaries.json"
# What a checkpoint must hold to continue a run exactly ("config" and "timed_steps" are newer: optional).
# (No scheduler or batch-generator state: the learning rate and the batches are functions of the step.)
CHECKPOINT_KEYS = ("step", "model", "optimizer", "torch_rng", "train_seconds", "wall_seconds")
TEMPORARY_SUFFIX = ".partial"


class FolderBusy(ValueError):
    """Another live process holds the folder's lock."""


# --- atomic files ---------------------------------------------------------------------------------------

def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` with what ``write(file)`` writes, all or nothing.

    A failure (full disk, no permission) leaves the previous file untouched, removes the temporary file and
    raises ValueError naming the path; anything else raised by ``write`` also removes the temporary file.
    """
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            reason = error.strerror or str(error)
            kept = "the previous version is kept" if path.exists() else "nothing was written"
            raise ValueError(f"cannot write {path} ({reason}); {kept}") from None
        raise
    _sync_folder(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); Windows cannot open folders, and needs no such step."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_json(path: Path, advice: str) -> Any:
    """A JSON file written by this module; a damaged one raises ValueError naming it and what to do."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problem = "is empty" if Path(path).stat().st_size == 0 else f"is not valid JSON ({error})"
        raise ValueError(f"{path} {problem}; {advice}") from None


def save_config_file(config: RunConfig, path: Path) -> None:
    """A config as TOML (``sandbox run --config`` reads it back), written atomically."""
    write_text_atomically(Path(path), config_to_toml(config))


# --- locks ----------------------------------------------------------------------------------------------

if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(file) -> bool:
        file.seek(0)   # every process locks the same first byte
        try:
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
else:
    import fcntl

    def _try_lock(file) -> bool:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False


class FolderLock:
    """An exclusive lock on ``folder/.lock`` for this process; raises FolderBusy if another process holds it.

    The lock file holds the holder's pid, only to name it in the message a second writer gets.
    """

    def __init__(self, folder: Path, argument: str, what: str):
        self.path = Path(folder) / LOCK
        try:
            self.file = open(self.path, "a+")
        except OSError as error:
            raise ValueError(f"{argument}: cannot open {self.path} ({error.strerror})") from None
        if not _try_lock(self.file):
            self.file.seek(0)
            holder = self.file.read().strip()
            self.file.close()
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise FolderBusy(f"{argument}: {folder} is in use: another process{pid} is {what} it; "
                             "wait for it to finish or stop it, then try again")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            self.file.close()   # closing the descriptor releases the lock


def is_locked(folder: Path) -> bool:
    """Whether some process holds ``folder``'s lock right now (without keeping it)."""
    if not (Path(folder) / LOCK).is_file():
        return False
    try:
        FolderLock(folder, "", "").release()
        return False
    except FolderBusy:
        return True


# --- run folders ----------------------------------------------------------------------------------------

def is_run_folder(folder: Path) -> bool:
    return (Path(folder) / CONFIG).is_file() and any((Path(folder) / name).exists() for name in (METRICS, CHECKPOINT))


def default_run_name(config: RunConfig) -> str:
    return f"{config.rule}-{config.task}-{datetime.now():%Y%m%d-%H%M%S}"


class RunFolder:
    """One run folder, locked for writing while this object is open (``close``, or use it with ``with``)."""

    def __init__(self, path: Path, lock: FolderLock):
        self.path, self._lock = Path(path), lock

    # opening
    @classmethod
    def create(cls, out: str | None, config: RunConfig) -> RunFolder:
        """A new folder: ``out``, or ``runs/<rule>-<task>-<time>``; if taken, the first free ``-1``, ``-2``..."""
        base = Path(out) if out else Path("runs") / default_run_name(config)
        if base.name in ("", ".", ".."):
            raise ValueError(f"out: expected the path of a new folder, got '{out}'")
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ValueError(f"out: '{base.parent}' exists and is not a folder") from None
        except OSError as error:
            raise ValueError(f"out: cannot create '{base.parent}' ({error.strerror})") from None
        candidate, suffix = base, 0
        while True:
            try:
                candidate.mkdir()   # atomic: two runs started together cannot get the same folder
                break
            except FileExistsError:
                suffix += 1
                candidate = base.with_name(f"{base.name}-{suffix}")
            except OSError as error:
                raise ValueError(f"out: cannot create the run folder '{candidate}' ({error.strerror})") from None
        return cls(candidate, FolderLock(candidate, "out", "training into"))

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        """An existing run folder, to continue its run; refuses one that another trainer is writing."""
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise ValueError(f"resume: '{path}' is not a run folder (no {CONFIG})")
        folder = cls(path, FolderLock(path, "resume", "training into"))
        for leftover in path.glob(f"*{TEMPORARY_SUFFIX}"):   # from a writer killed mid-write; we hold the lock
            leftover.unlink()
        return folder

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # config
    def write_config(self, config: RunConfig) -> None:
        save_config_file(config, self.path / CONFIG)

    def read_config(self) -> dict[str, Any]:
        return read_run_config(self.path)

    # metrics
    def append_metrics(self, record: dict[str, Any]) -> None:
        """One line; a crash mid-line leaves a torn last line, which ``read_metrics`` drops."""
        try:
            with open(self.path / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as error:
            raise ValueError(f"cannot write {self.path / METRICS} ({error.strerror}); "
                             f"free some space, then continue with: sandbox run --resume {self.path}") from None

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def keep_metrics_until(self, step: int) -> None:
        """Drop the records after ``step`` (an interrupted session's, about to be recomputed) and a torn line."""
        records = [r for r in self.read_metrics() if r["step"] <= step]
        write_text_atomically(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in records))

    # TensorBoard events
    def keep_events_until(self, step: int) -> None:
        """Drop the events after ``step`` from the event files, as ``keep_metrics_until`` does for the metrics
        (TensorBoard's fast loader ignores the writer's purge_step and would show those steps twice)."""
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        for path in self.path.glob("events.out.tfevents.*"):
            records = list(RawEventFileLoader(str(path)).Load())
            kept = [record for record in records if Event.FromString(record).step <= step]
            if len(kept) == len(records):
                continue

            def write_kept(f: BinaryIO, kept: list[bytes] = kept) -> None:
                writer = RecordWriter(f)
                for record in kept:
                    writer.write(record)

            write_atomically(path, write_kept)

    # results
    def write_results(self, results: dict[str, Any]) -> None:
        write_text_atomically(self.path / RESULTS, json.dumps(results, indent=2) + "\n")

    # checkpoint
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        import torch   # here, not at the top: the commands that only read folders start without torch

        try:
            write_atomically(self.path / CHECKPOINT, lambda f: torch.save(state, f))
        except ValueError as error:
            raise ValueError(f"checkpoint: {error}; free some space, then continue from the last checkpoint "
                             f"with: sandbox run --resume {self.path}") from None

    def load_checkpoint(self, device: torch.device) -> dict[str, Any]:
        """The checkpoint's state; a missing, damaged or incomplete one raises ValueError naming it."""
        path = self.path / CHECKPOINT
        if not path.is_file():
            raise ValueError(f"resume: no {CHECKPOINT} in '{self.path}' (the run stopped before its first checkpoint)")
        import torch

        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as error:   # truncated or foreign file: the user's input problem, not a crash
            raise ValueError(f"resume: cannot load {path} ({type(error).__name__}); "
                             "is it a complete checkpoint of this run? Start a new run if it is lost") from None
        missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
        if missing:
            raise ValueError(f"resume: {path} lacks {', '.join(repr(k) for k in missing)} (not a checkpoint "
                             "written by `sandbox run`, or damaged); start a new run")
        return state


def read_run_config(folder: Path) -> dict[str, Any]:
    """The keys a run folder's config.toml sets; ``out`` is dropped (older versions saved it)."""
    try:
        config = load_config(Path(folder) / CONFIG)
    except ValueError as error:
        raise ValueError(f"{error}; repair that file by hand (the run's checkpoint.pt holds the settings it "
                         "was trained with), or start a new run") from None
    config.pop("out", None)
    return config


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a torn last line (a writer stopped mid-line) is dropped with a warning."""
    path = Path(folder) / METRICS
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int) or "split" not in record:
                raise ValueError
        except ValueError:
            if number == len(lines):   # no newline after it: the last write was cut short
                print(f"warning: {path}: dropped a torn last line (its writer was stopped mid-line)", file=sys.stderr)
                break
            raise ValueError(f"{path}: line {number} is damaged (expected one JSON record with step and split); "
                             "delete that line, then try again") from None
        records.append(record)
    return records


def read_results(folder: Path) -> dict[str, Any] | None:
    """A run's results.json; None if the run has not finished. A damaged one raises ValueError naming it."""
    path = Path(folder) / RESULTS
    if not path.is_file():
        return None
    advice = (f"delete it, then write it again from the run's last checkpoint with: sandbox run --resume {folder}")
    results = read_json(path, advice)
    if not isinstance(results, dict):
        raise ValueError(f"{path} is not a results object; {advice}")
    return results


def config_differences(saved: dict[str, Any], current: dict[str, Any], may_change: set[str]) -> list[str]:
    """``key (saved value, current value)`` for each key, task_args.NAME included, that differs."""
    saved, current = flatten(saved), flatten(current)
    keys = [k for k in dict.fromkeys([*saved, *current]) if k not in may_change]
    return [f"{k} (checkpoint {saved.get(k, '(unset)')!r}, config.toml {current.get(k, '(unset)')!r})"
            for k in keys if saved.get(k) != current.get(k)]


# --- ablation folders -----------------------------------------------------------------------------------

def ablation_run_folder(root: Path, name: str) -> Path:
    """The one folder of the planned run ``name`` (other folders under runs/ are not the ablation's)."""
    return Path(root) / "runs" / name


def write_plan(root: Path, plan: dict[str, Any]) -> None:
    write_text_atomically(Path(root) / PLAN, json.dumps(plan, indent=1) + "\n")


def read_plan(root: Path) -> dict[str, Any] | None:
    """An ablation folder's plan; None if there is none. A damaged one raises ValueError naming it."""
    path = Path(root) / PLAN
    if not path.is_file():
        return None
    plan = read_json(path, "rerun `sandbox ablate RECIPE --out` on this folder to write it again")
    if not isinstance(plan, dict) or not isinstance(plan.get("runs"), list) or "recipe" not in plan:
        raise ValueError(f"{path} is not an ablation plan; rerun `sandbox ablate RECIPE --out` on this folder")
    return plan


def _fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _written_summaries(root: Path) -> dict[str, list[str]]:
    path = Path(root) / SUMMARY_FINGERPRINTS
    if not path.is_file():
        return {}
    written = read_json(path, "delete it only if every summary file in that folder came from `sandbox report`")
    return written if isinstance(written, dict) else {}


def check_summaries_replaceable(root: Path, names: list[str]) -> None:
    """Refuse (ValueError) if any of ``names`` exists in ``root`` but is not, byte for byte, a file that
    ``write_summary_files`` wrote there: the user's own file, or one they edited, is never replaced."""
    written = _written_summaries(root)
    for name in names:
        path = Path(root) / name
        if path.exists() and _fingerprint(path.read_bytes()) not in written.get(name, []):
            raise ValueError(f"DIR: {path} was not written by `sandbox report` (or was edited since); "
                             "move it away (delete it if it is an old summary of this folder), or summarise "
                             "into another folder")


def write_summary_files(root: Path, files: dict[str, bytes]) -> None:
    """Write the summaries atomically, recording their fingerprints first, so that a crash half-way still
    leaves every file recognisably ours (its old or its new fingerprint is on record)."""
    root = Path(root)
    check_summaries_replaceable(root, list(files))
    written = _written_summaries(root)
    for name, data in files.items():
        old = [_fingerprint((root / name).read_bytes())] if (root / name).exists() else []
        written[name] = old + [_fingerprint(data)]
    write_text_atomically(root / SUMMARY_FINGERPRINTS, json.dumps(written, indent=1) + "\n")
    for name, data in files.items():
        write_atomically(root / name, lambda f, data=data: f.write(data))
    written = {name: [_fingerprint(files[name])] if name in files else prints for name, prints in written.items()}
    write_text_atomically(root / SUMMARY_FINGERPRINTS, json.dumps(written, indent=1) + "\n")
