"""The configuration of one training run: ``RunConfig``, its TOML form, and the checks on every value.

The fields mirror the ``sandbox run`` flags (``--batch-size`` is ``batch_size``). A run's values come from
three layers, later ones winning: the defaults below, a TOML file (``--config FILE``), the flags actually
given. ``resolve_config`` merges and checks them; ``config_to_toml`` gives the TOML that the run folder keeps as
``config.toml`` (see ``sandbox.runfolder``), which ``load_config`` reads back, so any run can be repeated with
``sandbox run --config runs/<name>/config.toml``. That TOML says what to train, never where: ``out`` is left
out, so a repeated run gets a folder of its own.

TOML layout: every field at top level, except ``task_args``, which is a table::

    rule = "momentum_delta"
    task = "mqar"
    steps = 400
    [task_args]
    num_kv_pairs = 8
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from sandbox.inits import DECAY_INITS, DEFAULT_DECAY_INIT, DEFAULT_MOMENTUM_INIT

ATTENTION = "attention"
MAX_SEED = 2**63 - 1   # TOML integers are 64-bit signed
IMPLS = ("auto", "naive", "chunk", "triton")


@dataclass
class RunConfig:
    # what to train
    rule: str = "momentum_delta"        # one of `sandbox rules`, or "attention" (softmax baseline)
    task: str = "mqar"
    task_args: dict[str, Any] = field(default_factory=dict)   # task parameters, see `sandbox tasks`
    seq_len: int | None = None          # None: the task's default length
    # model
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    chunk_size: int = 64                # tokens per chunk of the chunkwise form / kernels
    short_conv: bool = True             # causal depthwise conv (kernel 4) + SiLU on q, k, v
    stability_constraint: bool = True   # MDN constraint coupling alpha, beta and eta (momentum rules)
    min_log_mu: float = -2.0            # floor of log(mu): momentum never decays faster than exp(-2) a token
    decay_init: str = DEFAULT_DECAY_INIT        # init of the decay alpha (sandbox.inits.DECAY_INITS)
    momentum_init: str = DEFAULT_MOMENTUM_INIT  # init of the momentum decay mu (same names)
    allow_neg_eigval: bool = False      # delta rules: beta in (0, 2) instead of (0, 1)
    # optimisation
    steps: int = 400
    batch_size: int = 64
    lr: float = 5e-3                    # measured: attention with the short conv needs it to learn MQAR in 400 steps
    weight_decay: float = 0.1
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    # evaluation, logging, checkpoints (in steps)
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    checkpoint_every: int = 100
    # where and how
    device: str = "auto"                # auto: cuda if available, else cpu
    impl: str = "auto"                  # auto: triton on CUDA when its kernels work here, else chunk
    compile: bool = True                # capture the training step as a CUDA graph (see train.py)
    inductor: bool = False              # with compile: torch.compile the forward and loss too
    out: str | None = None              # None: runs/<rule>-<task>-<time>

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_TYPES: dict[str, type] = {
    "rule": str, "task": str, "task_args": dict, "seq_len": int, "d_model": int, "layers": int, "heads": int,
    "chunk_size": int, "short_conv": bool, "stability_constraint": bool, "min_log_mu": float, "decay_init": str,
    "momentum_init": str, "allow_neg_eigval": bool, "steps": int,
    "batch_size": int, "lr": float, "weight_decay": float, "warmup_steps": int, "grad_clip": float, "seed": int,
    "eval_every": int, "eval_batches": int, "log_every": int, "checkpoint_every": int, "device": str,
    "impl": str, "compile": bool, "inductor": bool, "out": str,
}
OPTIONAL_FIELDS = ("seq_len", "out")
assert set(FIELD_TYPES) == {f.name for f in fields(RunConfig)}


def check_type(name: str, value: Any) -> Any:
    """Check one value's type (ints are accepted where floats are expected); raise ValueError naming it."""
    expected = FIELD_TYPES[name]
    if value is None and name in OPTIONAL_FIELDS:
        return None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ValueError(f"{name}: expected {expected.__name__}, got {value!r}")
    if expected is dict:
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"task_args: expected parameter names as strings, got {key!r}")
        return dict(value)
    return value


def _check_values(config: RunConfig) -> None:
    """Ranges and combinations the model and trainer rely on; each error names the field."""
    from sandbox.rules import get_rule, list_rules

    rules = list_rules() + [ATTENTION]
    if config.rule not in rules:
        raise ValueError(f"rule: unknown rule '{config.rule}', expected one of: {', '.join(rules)}")
    if config.impl not in IMPLS:
        raise ValueError(f"impl: expected one of {', '.join(IMPLS)}, got '{config.impl}'")
    positive = ("d_model", "layers", "heads", "steps", "batch_size", "eval_every", "eval_batches",
                "log_every", "checkpoint_every")
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {getattr(config, name)}")
    if config.seq_len is not None and config.seq_len < 2:
        raise ValueError(f"seq_len: expected at least 2, got {config.seq_len}")
    if config.d_model % config.heads:
        raise ValueError(f"d_model: expected a multiple of heads ({config.heads}), got {config.d_model}")
    if config.chunk_size not in (8, 16, 32, 64, 128):
        raise ValueError(f"chunk_size: expected one of 8, 16, 32, 64, 128, got {config.chunk_size}")
    if not 0 < config.lr < math.inf:
        raise ValueError(f"lr: expected a positive finite number, got {config.lr}")
    for name in ("weight_decay", "warmup_steps"):
        if not 0 <= getattr(config, name) < math.inf:
            raise ValueError(f"{name}: expected a finite number >= 0, got {getattr(config, name)}")
    if not 0 < config.grad_clip < math.inf:
        raise ValueError(f"grad_clip: expected a positive finite number, got {config.grad_clip}")
    if not -math.inf < config.min_log_mu < 0:
        raise ValueError(f"min_log_mu: expected a finite negative number (log of the smallest mu), got {config.min_log_mu}")
    if not 0 <= config.seed <= MAX_SEED:
        raise ValueError(f"seed: expected an integer from 0 to 2**63 - 1, got {config.seed}")
    for name in ("decay_init", "momentum_init"):
        if getattr(config, name) not in DECAY_INITS:
            raise ValueError(f"{name}: expected one of {', '.join(DECAY_INITS)}, got '{getattr(config, name)}'")
    if config.allow_neg_eigval and not (config.rule != ATTENTION and get_rule(config.rule).delta):
        delta_rules = [name for name in list_rules() if get_rule(name).delta]
        raise ValueError(f"allow_neg_eigval: only the delta rules ({', '.join(delta_rules)}) have a negative "
                         f"eigenvalue to allow, got rule '{config.rule}'")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", config.device):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got '{config.device}'")


def resolve_config(*layers: dict[str, Any]) -> RunConfig:
    """Defaults, then each dict of overrides in order (file values, then flags); checked.

    ``task_args`` tables merge key by key, so a flag ``--task-arg num_kv_pairs=4`` keeps the file's other
    task parameters.
    """
    values = RunConfig().to_dict()
    for layer in layers:
        for name, value in layer.items():
            if name not in FIELD_TYPES:
                raise ValueError(f"{name}: unknown config key, expected one of: {', '.join(FIELD_TYPES)}")
            value = check_type(name, value)
            values[name] = {**values["task_args"], **value} if name == "task_args" else value
    config = RunConfig(**values)
    _check_values(config)
    return config


def read_toml(path: str | Path, what: str, folder_hint: str = "") -> dict[str, Any]:
    """The TOML file ``path`` as a dict; any problem raises ValueError naming the argument ``what``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: '{path}' is a folder, expected a TOML file{folder_hint}")
    if not path.is_file():
        raise ValueError(f"{what}: no such file '{path}'")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{what}: '{path}' is not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what}: '{path}' is not a text file, expected TOML") from None
    except OSError as e:
        raise ValueError(f"{what}: cannot read '{path}' ({e.strerror})") from None


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML run config; returns the keys it sets (type-checked), unknown keys raise ValueError."""
    data = read_toml(path, "config", " (a run's is <folder>/config.toml)")
    for name, value in data.items():
        if name not in FIELD_TYPES:
            raise ValueError(f"config key '{name}' in {path}: unknown, expected one of: {', '.join(FIELD_TYPES)}")
        try:
            data[name] = check_type(name, value)
        except ValueError as e:
            raise ValueError(f"config key {e} (in {path})") from None
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(str(value))


def config_to_toml(config: RunConfig) -> str:
    """The config as TOML that ``load_config`` reads back; ``out`` and fields that are None are left out."""
    lines = []
    for name, value in config.to_dict().items():
        if name not in ("task_args", "out") and value is not None:
            lines.append(f"{name} = {_toml_value(value)}")
    lines.append("")
    lines.append("[task_args]")
    for name, value in config.task_args.items():
        lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """``{"task_args": {"n": 4}, "lr": 0.1}`` -> ``{"task_args.n": 4, "lr": 0.1}``: one key per setting."""
    flat = {k: v for k, v in config.items() if k != "task_args"}
    flat.update({f"task_args.{k}": v for k, v in (config.get("task_args") or {}).items()})
    return flat
