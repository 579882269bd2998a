"""The registry of tasks: ``create_task(name, args, seq_len)``, ``list_tasks()``, ``TASKS``.

Adding a task: write a ``Task`` dataclass (fields = parameters with defaults, ``generate``, a docstring whose
first line describes it and which documents the metric), then add it to ``TASKS`` below. The task modules
import torch inside the functions that use it, not at their top, so that ``sandbox tasks`` (which only reads
the classes: docstrings, fields, metric) starts without importing torch (``tests/test_startup.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import IGNORE_INDEX, Task
from .copying import SelectiveCopy
from .memorization import Memorization
from .recall import MQAR, FuzzyRecall, NoisyRecall
from .state_tracking import Parity, Permutation
from .text import Text

TASKS: dict[str, type[Task]] = {
    task.name: task
    for task in (MQAR, FuzzyRecall, NoisyRecall, SelectiveCopy, Memorization, Parity, Permutation, Text)
}


def _parameters(task: type[Task]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(task) if f.init}


# The types a parameter may have, by name: the task modules use ``from __future__ import annotations``, so a
# field's type is the string written in its annotation (resolving all annotations, with typing.get_type_hints,
# would need torch for the tensor-valued fields that are not parameters).
PARAMETER_TYPES = {kind.__name__: kind for kind in (int, float, bool, str)}


def _kind(task: type[Task], f: dataclasses.Field) -> type:
    if isinstance(f.type, type):
        return f.type
    if f.type not in PARAMETER_TYPES:
        raise TypeError(f"task {task.name}: parameter {f.name!r} has type {f.type!r}, expected one of: "
                        f"{', '.join(PARAMETER_TYPES)}")
    return PARAMETER_TYPES[f.type]


def _convert(param: str, value: Any, kind: type) -> Any:
    """Turn a ``--task-arg NAME=VALUE`` string (or an already typed value) into the parameter's type."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"task_arg '{param}': expected true or false, got {value!r}")
    if kind in (int, float):
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and (kind is float or isinstance(value, int)):
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
        expected = "an int" if kind is int else "a number"
        raise ValueError(f"task_arg '{param}': expected {expected}, got {value!r}")
    if not isinstance(value, str):
        raise ValueError(f"task_arg '{param}': expected a string, got {value!r}")
    return value


def create_task(name: str, args: dict[str, Any] | None = None, seq_len: int | None = None) -> Task:
    """Build task ``name`` with parameters ``args`` (strings are converted); ``seq_len=None`` keeps the default."""
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}, expected one of: {', '.join(TASKS)}")
    task = TASKS[name]
    parameters = _parameters(task)
    values = {}
    for param, value in (args or {}).items():
        if param not in parameters:
            raise ValueError(f"task_arg '{param}': not a parameter of task '{name}', "
                             f"expected one of: {', '.join(parameters)}")
        values[param] = _convert(param, value, _kind(task, parameters[param]))
    if seq_len is not None:
        seq_len = _convert("seq_len", seq_len, int)
        if values.get("seq_len", seq_len) != seq_len:
            raise ValueError(f"seq_len: {seq_len} disagrees with task_arg seq_len={values['seq_len']}")
        values["seq_len"] = seq_len
    if values.get("seq_len", 1) < 1:
        raise ValueError(f"seq_len: expected a positive int, got {values['seq_len']}")
    return task(**values)


def list_tasks() -> list[tuple[str, str, dict[str, Any], str]]:
    """``(name, one-line description, {parameter: default}, metric name)`` for every task."""
    rows = []
    for name, task in TASKS.items():
        description = (task.__doc__ or "").strip().splitlines()[0]
        defaults = {param: f.default for param, f in _parameters(task).items()}
        rows.append((name, description, defaults, task.metric_name))
    return rows


__all__ = ["IGNORE_INDEX", "TASKS", "Task", "create_task", "list_tasks"]
