"""The Triton rule kernels as ``torch.library`` custom ops, so that nothing in a rule call breaks a graph.

``torch.compile`` would otherwise trace the kernels' Python launch code (block sizes, grids, buffers) and
CUDA-graph capture needs every call to be pure device work: as custom ops, a rule call is one opaque node
``sandbox::rule_forward`` whose backward is ``sandbox::rule_backward``. Both run the kernels of
``sandbox.kernels`` through ``ChunkRuleFunction``'s own forward and backward.

The backward op recomputes the forward (three kernels, cheap next to the backward's) instead of receiving
the forward's intermediates: the ops' inputs and outputs are then only the rule's own tensors, whose shapes
the fake implementations below can state without knowing the kernels' internal buffers.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from sandbox.rules import Rule, State, get_rule
from sandbox.rules.base import check_chunk_size, check_inputs

from . import GATES, ChunkRuleFunction

OPTIONAL_INPUTS = GATES + ("S_init", "M_init")


class _Context:
    """What ``ChunkRuleFunction.forward`` and ``backward`` use of an autograd context, to call them directly."""

    def __init__(self, needs_input_grad: bool):
        self.needs_input_grad = (False, False, False) + (needs_input_grad,) * 9   # rule, scale, C, then tensors

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        self.saved_tensors = tensors

    def set_materialize_grads(self, value: bool) -> None:
        pass


def _run_forward(ctx: _Context, rule: str, scale: float, chunk_size: int, tensors: list[Tensor | None]):
    return ChunkRuleFunction.forward(ctx, get_rule(rule), scale, chunk_size, *tensors)


@torch.library.custom_op("sandbox::rule_forward", mutates_args=())
def rule_forward(rule: str, scale: float, chunk_size: int, q: Tensor, k: Tensor, v: Tensor,
                 log_alpha: Optional[Tensor], beta: Optional[Tensor], log_mu: Optional[Tensor], eta: Optional[Tensor],
                 S_init: Optional[Tensor], M_init: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``o [B, T, H, V]``, final ``S [B, H, K, V]`` and final ``M`` (empty for rules without momentum)."""
    tensors = [q, k, v, log_alpha, beta, log_mu, eta, S_init, M_init]
    out = _run_forward(_Context(needs_input_grad=False), rule, scale, chunk_size, tensors)
    M = out[2] if len(out) == 3 else q.new_empty(0, dtype=torch.float32)
    return out[0].contiguous(), out[1], M


@rule_forward.register_fake
def _(rule, scale, chunk_size, q, k, v, log_alpha, beta, log_mu, eta, S_init, M_init):
    B, _, H, K = q.shape
    V = v.shape[-1]
    S = q.new_empty(B, H, K, V, dtype=torch.float32)
    M = q.new_empty(B, H, K, V, dtype=torch.float32) if get_rule(rule).momentum else q.new_empty(0, dtype=torch.float32)
    return v.new_empty(v.shape), S, M   # contiguous, as the kernels write them


@torch.library.custom_op("sandbox::rule_backward", mutates_args=())
def rule_backward(rule: str, scale: float, chunk_size: int, q: Tensor, k: Tensor, v: Tensor,
                  log_alpha: Optional[Tensor], beta: Optional[Tensor], log_mu: Optional[Tensor], eta: Optional[Tensor],
                  S_init: Optional[Tensor], M_init: Optional[Tensor], do: Tensor, dS: Optional[Tensor],
                  dM: Optional[Tensor]) -> list[Tensor]:
    """Gradients of q, k, v, then of each given gate and initial state (in that order), in their dtypes."""
    tensors = [q, k, v, log_alpha, beta, log_mu, eta, S_init, M_init]
    ctx = _Context(needs_input_grad=True)
    _run_forward(ctx, rule, scale, chunk_size, tensors)   # the intermediates the backward reads
    grads = ChunkRuleFunction.backward(ctx, do, dS, dM)[3:]
    return [grad.to(x.dtype).contiguous() for grad, x in zip(grads, tensors) if x is not None]


@rule_backward.register_fake
def _(rule, scale, chunk_size, q, k, v, log_alpha, beta, log_mu, eta, S_init, M_init, do, dS, dM):
    return [x.new_empty(x.shape) for x in (q, k, v, log_alpha, beta, log_mu, eta, S_init, M_init) if x is not None]


def _setup_context(ctx, inputs, output) -> None:
    ctx.rule, ctx.scale, ctx.chunk_size = inputs[:3]
    ctx.save_for_backward(*inputs[3:])


def _backward(ctx, do: Tensor, dS: Tensor | None, dM: Tensor | None):
    tensors = ctx.saved_tensors
    if not get_rule(ctx.rule).momentum:
        dM = None   # the empty placeholder output
    grads = iter(rule_backward(ctx.rule, ctx.scale, ctx.chunk_size, *tensors, do, dS, dM))
    return (None, None, None, *(next(grads) if x is not None else None for x in tensors))


rule_forward.register_autograd(_backward, setup_context=_setup_context)


def triton_rule(rule: Rule, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                initial_state: State | None = None, output_final_state: bool = False, chunk_size: int = 64,
                **gates: Tensor) -> tuple[Tensor, State | None]:
    """``rule.triton`` through the custom ops: the same arguments, checks and results."""
    check_chunk_size(chunk_size, allowed=(16, 32, 64))
    inputs = check_inputs(rule, q, k, v, gates, initial_state)
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"q: the Triton kernels need CUDA tensors (got a tensor on {q.device}); for CPU tensors "
                         "set TRITON_INTERPRET=1 before triton is imported")
    K, V = q.shape[-1], v.shape[-1]
    if K > 256 or V > 256:
        raise ValueError(f"q, v: the Triton kernels support head sizes K, V <= 256, got K = {K}, V = {V}")
    init = inputs.initial_state
    S_init, M_init = (init if rule.momentum else (init, None)) if init is not None else (None, None)
    o, S, M = rule_forward(rule.name, K ** -0.5 if scale is None else scale, chunk_size, q, inputs.k, inputs.v,
                           *(inputs.gates.get(name) for name in GATES), S_init, M_init)
    if not output_final_state:
        return o, None
    return o, ((S, M) if rule.momentum else S)
