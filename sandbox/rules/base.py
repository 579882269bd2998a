"""Input checking and the per-token reference loop, shared by every update rule (``Rule`` is in ``rule.py``).

Conventions (fla layout): ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, gates ``[B, T, H]``, states
``[B, H, K, V]``; the readout happens after the update, ``o_t = scale * S_t^T q_t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .rule import Rule, State

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Inputs:
    """Checked inputs of one call; ``gates`` holds exactly the rule's gates."""

    q: Tensor
    k: Tensor
    v: Tensor
    gates: dict[str, Tensor]
    initial_state: State | None


def check_chunk_size(chunk_size: int, allowed: tuple[int, ...]) -> None:
    if not isinstance(chunk_size, int) or chunk_size not in allowed:
        raise ValueError(f"chunk_size: expected a power of two in {allowed}, got {chunk_size!r}")


def _check_tensor(name: str, x: object, shape: tuple[int, ...], device: torch.device) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} like q, got one on {x.device}")
    return x


def check_inputs(rule: Rule, q: Tensor, k: Tensor, v: Tensor, gates: dict[str, Tensor],
                 initial_state: State | None) -> Inputs:
    """Validate shapes, dtypes, devices, gate names and the initial state; raise ValueError naming the argument."""
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected a tensor of shape [B, T, H, K], got {getattr(q, 'shape', type(q).__name__)}")
    B, T, H, K = q.shape
    if T < 1:
        raise ValueError("q: expected at least one token (T >= 1), got T = 0")
    _check_tensor("q", q, (B, T, H, K), q.device)
    _check_tensor("k", k, (B, T, H, K), q.device)
    if not isinstance(v, Tensor) or v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v: expected shape [B, T, H, V] = [{B}, {T}, {H}, V], got {list(getattr(v, 'shape', []))}")
    V = v.shape[3]
    _check_tensor("v", v, (B, T, H, V), q.device)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")

    unexpected = sorted(set(gates) - set(rule.gates))
    if unexpected:
        expected = ", ".join(rule.gates) or "no gates"
        raise ValueError(f"{unexpected[0]}: unexpected gate for rule '{rule.name}' (it takes {expected})")
    for name in rule.gates:
        if gates.get(name) is None:
            raise ValueError(f"{name}: missing gate for rule '{rule.name}' (it takes {', '.join(rule.gates)})")
        _check_tensor(name, gates[name], (B, T, H), q.device)

    if initial_state is not None:
        state_shape = (B, H, K, V)
        if rule.momentum:
            if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
                raise ValueError(f"initial_state: rule '{rule.name}' expects a tuple (S, M) of two "
                                 f"[B, H, K, V] = {list(state_shape)} tensors")
            initial_state = tuple(_check_tensor(f"initial_state[{i}]", s, state_shape, q.device)
                                  for i, s in enumerate(initial_state))
        else:
            if not isinstance(initial_state, Tensor):
                raise ValueError(f"initial_state: rule '{rule.name}' expects one tensor S of shape "
                                 f"[B, H, K, V] = {list(state_shape)}, got {type(initial_state).__name__}")
            _check_tensor("initial_state", initial_state, state_shape, q.device)
    return Inputs(q, k, v, {name: gates[name] for name in rule.gates}, initial_state)


def compute_dtype(x: Tensor) -> torch.dtype:
    """States and accumulation: float64 for float64 inputs (gradcheck), float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def initial_states(rule: Rule, inputs: Inputs, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """The carried states as a tuple ``(S,)`` or ``(S, M)``, zeros where no initial state was given."""
    B, _, H, K = inputs.q.shape
    V = inputs.v.shape[3]
    count = 2 if rule.momentum else 1
    if inputs.initial_state is None:
        return tuple(inputs.q.new_zeros(B, H, K, V, dtype=dtype) for _ in range(count))
    given = inputs.initial_state if rule.momentum else (inputs.initial_state,)
    return tuple(s.to(dtype) for s in given)


def as_state(rule: Rule, states: tuple[Tensor, ...]) -> State:
    return states if rule.momentum else states[0]


def naive_loop(rule: Rule, inputs: Inputs, scale: float | None,
               output_final_state: bool) -> tuple[Tensor, State | None]:
    """Run ``rule.step`` token by token and read out ``o_t = scale * S_t^T q_t`` after each update."""
    q, k, v = inputs.q, inputs.k, inputs.v
    dtype = compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = as_state(rule, initial_states(rule, inputs, dtype))
    gates = {name: g.to(dtype) for name, g in inputs.gates.items()}
    outputs = []
    for t in range(q.shape[1]):
        state = rule.step(state, k[:, t].to(dtype), v[:, t].to(dtype),
                          **{name: g[:, t] for name, g in gates.items()})
        S = state[0] if rule.momentum else state
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t].to(dtype)))
    o = torch.stack(outputs, dim=1).to(v.dtype)
    return o, (state if output_final_state else None)
