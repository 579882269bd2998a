"""Triton chunk kernels (forward and backward) for every rule, behind ``rule.triton(...)``.

``triton_forward`` runs the kernels of ``chunk.py`` through one ``torch.autograd.Function``; its backward is
the hand-derived chunkwise backward (``chunk.py``), never autograd through a reference. PyTorch glue here is
only O(B T H) work on the gates (casts, padding, chunk-local cumsums and their reverse) and buffer set-up.

Layout ``[B, T, H, D]``; gates are handled as float32 ``[B * H, N * C]`` (padded to whole chunks with
log-gates 0 and beta = eta = 0, which leaves the states unchanged); states float32 ``[B, H, K, V]``.
On CPU tensors the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), slowly but exactly in float32.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from sandbox.rules.base import Inputs, Rule, State

from .chunk import (backward_chunk_kernel, backward_intra_kernel, backward_scan_kernel, forward_output_kernel,
                    forward_scan_kernel, prepare_kernel)

GATES = ("log_alpha", "beta", "log_mu", "eta")


def _chunk_gate(x: Tensor | None, chunks: int, C: int, log_cumsum: bool) -> Tensor | None:
    """``[B, T, H]`` -> float32 ``[B * H, N * C]``, zero-padded, chunk-local cumsum for log gates."""
    if x is None:
        return None
    B, T, H = x.shape
    x = F.pad(x.float().transpose(1, 2), (0, chunks * C - T))
    if log_cumsum:
        x = x.reshape(B, H, chunks, C).cumsum(-1)
    return x.reshape(B * H, chunks * C).contiguous()


def _gate_grad(grad: Tensor, like: Tensor, C: int, log_cumsum: bool) -> Tensor:
    """Kernel gate gradients ``[B * H, N * C]`` -> ``[B, T, H]`` in the gate's dtype.

    For log gates the kernel returns gradients of the chunk-local cumsums; a reverse cumsum inside each
    chunk (padded positions included: they carry the real tokens' sums) turns them into gradients of the gate.
    """
    B, T, H = like.shape
    grad = grad.reshape(B, H, -1, C)
    if log_cumsum:
        grad = grad.flip(-1).cumsum(-1).flip(-1)
    return grad.reshape(B, H, -1)[..., :T].transpose(1, 2).to(like.dtype)


def _launch_config(q: Tensor, K: int, V: int, switches: dict) -> dict:
    """Dot precision and, per kernel, block sizes and launch options (``BV``/``BK`` tiles, warps, stages).

    The interpreter runs programs one by one: one V tile there, and no launch options. On the GPU the
    options are the fastest of a sweep on an H100 at K = V = 128 (see BENCHMARKS.md, kernel versions).
    """
    BK = max(16, triton.next_power_of_2(K))
    # float32 inputs get float32-accurate products (tf32x3); half inputs tf32 (well inside their own rounding).
    prec = "tf32x3" if q.dtype in (torch.float32, torch.float64) else "tf32"
    if not q.is_cuda:
        BV = max(16, triton.next_power_of_2(V))
        return {"PREC": prec, "prepare": {"BK": BK}, "forward_scan": {"BK": BK, "BV": BV},
                "forward_output": {"BK": BK, "BV": BV}, "backward_intra": {"BK": BK, "BV": BV},
                "backward_scan": {"BK": BK, "BV": BV}, "backward_chunk": {"BK": min(BK, 64), "BV": BV}}
    V_pow2 = max(16, triton.next_power_of_2(V))
    BV = min(V_pow2, 32 if BK <= 128 else 16)
    plain = {"num_warps": 4, "num_stages": 1}
    # The parallel per-chunk kernels recompute the C x C intra-chunk matrices per V tile: wider V tiles.
    BV_out = min(V_pow2, 64 if BK <= 128 else 32)
    scans = {"BK": BK, "BV": BV, **plain}
    forward_scan, backward_scan = dict(scans), dict(scans)
    if BK <= 128:
        if switches["MOMENTUM"] and not switches["DELTA"]:
            # Two states and little else per chunk: wider V tiles on 8 warps halve the programs' serial chains.
            forward_scan.update(BV=min(V_pow2, 64), num_warps=8)
        else:
            # Two stages prefetch the next chunk's K, V (and Tm) while this chunk's products run.
            forward_scan.update(num_stages=2)
        if switches["MOMENTUM"]:
            backward_scan.update(BV=min(V_pow2, 64), num_warps=8)
    # The per-chunk backward holds many C x K and C x C accumulators: K in tiles of at most 64, and 8 warps
    # (fewer registers each) once decay or the delta correction adds theirs.
    backward_chunk = {"BK": min(BK, 64), "BV": BV, "num_warps": 4, "num_stages": 2}
    # (Not on 16-wide tiles: with 8 warps there the momentum backward faulted on the H100, K = 16 in float32.)
    if (switches["DECAY"] or switches["DELTA"]) and BK >= 32:
        backward_chunk.update(num_warps=8, num_stages=1)
    return {"PREC": prec, "prepare": {"BK": BK, **plain}, "forward_scan": forward_scan,
            "forward_output": {"BK": BK, "BV": BV_out, **plain}, "backward_intra": {"BK": BK, "BV": BV_out, **plain},
            "backward_scan": backward_scan, "backward_chunk": backward_chunk}


class ChunkRuleFunction(torch.autograd.Function):
    """Chunkwise forward and backward of one rule; inputs and outputs as in ``rule.chunk``."""

    @staticmethod
    def forward(ctx, rule: Rule, scale: float, C: int, q: Tensor, k: Tensor, v: Tensor,
                log_alpha: Tensor | None, beta: Tensor | None, log_mu: Tensor | None, eta: Tensor | None,
                S_init: Tensor | None, M_init: Tensor | None):
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = triton.cdiv(T, C)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        gA = _chunk_gate(log_alpha, N, C, log_cumsum=True)
        b = _chunk_gate(beta, N, C, log_cumsum=False)
        gM = _chunk_gate(log_mu, N, C, log_cumsum=True)
        e = _chunk_gate(eta, N, C, log_cumsum=False)
        switches = {"DECAY": log_alpha is not None, "BETA": beta is not None, "MOMENTUM": rule.momentum}
        cfg = _launch_config(q, K, V, {**switches, "DELTA": rule.delta})
        f32 = {"device": q.device, "dtype": torch.float32}
        S_init = None if S_init is None else S_init.float().contiguous()
        M_init = None if M_init is None else M_init.float().contiguous()
        save = any(ctx.needs_input_grad)

        tm = None
        if rule.delta:
            tm = torch.empty(B * H, N, C, C, **f32)
            prepare_kernel[(N, B * H)](k, gA, b, gM, e, tm, T, H, K, N, C=C, **switches, **cfg["prepare"])
        u = torch.empty(B, T, H, V, **f32) if rule.delta else v
        s_chunks = torch.empty(B * H, N, K, V, **f32)
        m_chunks = torch.empty(B * H, N, K, V, **f32) if rule.momentum else None
        S_out = torch.empty(B, H, K, V, **f32)
        M_out = torch.empty(B, H, K, V, **f32) if rule.momentum else None
        grid = (triton.cdiv(V, cfg["forward_scan"]["BV"]), B * H)
        forward_scan_kernel[grid](k, v, gA, b, gM, e, tm, S_init, M_init, u, s_chunks, m_chunks, S_out, M_out,
                                  T, H, K, V, N, C=C, DELTA=rule.delta, HAS_INITIAL=S_init is not None,
                                  PREC=cfg["PREC"], **switches, **cfg["forward_scan"])
        o = torch.empty_like(v)
        grid = (N, B * H, triton.cdiv(V, cfg["forward_output"]["BV"]))
        forward_output_kernel[grid](q, k, u, gA, b, gM, e, s_chunks, m_chunks, o, scale, T, H, K, V, N, C=C,
                                    PREC=cfg["PREC"], **switches, **cfg["forward_output"])
        if not save:
            u = s_chunks = m_chunks = None

        ctx.save_for_backward(q, k, v, gA, b, gM, e, tm, u, s_chunks, m_chunks, log_alpha, beta, log_mu, eta,
                              S_init, M_init)
        ctx.rule, ctx.scale, ctx.C, ctx.cfg, ctx.switches = rule, scale, C, cfg, switches
        ctx.set_materialize_grads(False)
        return (o, S_out, M_out) if rule.momentum else (o, S_out)

    @staticmethod
    def backward(ctx, do: Tensor, dS_final: Tensor | None, dM_final: Tensor | None = None):
        (q, k, v, gA, b, gM, e, tm, u, s_chunks, m_chunks, log_alpha, beta, log_mu, eta,
         S_init, M_init) = ctx.saved_tensors
        rule, scale, C, cfg, switches = ctx.rule, ctx.scale, ctx.C, ctx.cfg, ctx.switches
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = triton.cdiv(T, C)
        f32 = {"device": q.device, "dtype": torch.float32}
        if do is None:
            do = torch.zeros_like(v)
        do = do.contiguous()
        has_dfinal = dS_final is not None or dM_final is not None
        if has_dfinal:
            dS_final = torch.zeros(B, H, K, V, **f32) if dS_final is None else dS_final.float().contiguous()
            if rule.momentum:
                dM_final = torch.zeros(B, H, K, V, **f32) if dM_final is None else dM_final.float().contiguous()

        dr = torch.empty(B, T, H, V, **f32)
        ds_chunks = torch.empty(B * H, N, K, V, **f32)
        dm_chunks = torch.empty(B * H, N, K, V, **f32) if rule.momentum else None
        dS_init = torch.empty(B, H, K, V, **f32)
        dM_init = torch.empty(B, H, K, V, **f32) if rule.momentum else None
        dw = torch.empty(B * H, N, C, C, **f32)
        backward_intra_kernel[(N, B * H)](q, k, u, do, gA, b, gM, e, dr, dw, scale, T, H, K, V, N, C=C,
                                          PREC=cfg["PREC"], **switches, **cfg["backward_intra"])
        grid = (triton.cdiv(V, cfg["backward_scan"]["BV"]), B * H)
        backward_scan_kernel[grid](q, k, do, gA, b, gM, e, tm, dS_final, dM_final, dr, ds_chunks, dm_chunks,
                                   dS_init, dM_init, scale, T, H, K, V, N, C=C, DELTA=rule.delta,
                                   HAS_DFINAL=has_dfinal, PREC=cfg["PREC"], **switches, **cfg["backward_scan"])

        dq = torch.empty(B, T, H, K, **f32)
        dk = torch.empty(B, T, H, K, **f32)
        k_tiles = triton.cdiv(K, cfg["backward_chunk"]["BK"])
        d_gates = {name: (torch.empty(k_tiles, *g.shape, **f32) if g is not None else None)
                   for name, g in zip(GATES, (gA, b, gM, e))}
        backward_chunk_kernel[(N, B * H, k_tiles)](q, k, v, do, gA, b, gM, e, u, dr, dw, s_chunks, m_chunks,
                                                   ds_chunks, dm_chunks, dq, dk, *d_gates.values(), scale,
                                                   T, H, K, V, N, C=C, DELTA=rule.delta, PREC=cfg["PREC"],
                                                   **switches, **cfg["backward_chunk"])

        grads = []
        for name, gate in zip(GATES, (log_alpha, beta, log_mu, eta)):
            if gate is None:
                grads.append(None)
                continue
            grad = d_gates[name].sum(0)                 # the K tiles' shares
            grads.append(_gate_grad(grad, gate, C, log_cumsum=name.startswith("log")))
        dS_init_out = None if S_init is None else dS_init
        dM_init_out = None if M_init is None else dM_init
        return (None, None, None, dq.to(q.dtype), dk.to(k.dtype), dr.to(v.dtype), *grads,
                dS_init_out, dM_init_out)


def triton_forward(rule: Rule, inputs: Inputs, scale: float | None, output_final_state: bool,
                   chunk_size: int) -> tuple[Tensor, State | None]:
    """``rule.triton``: checked inputs in, ``(o, final state or None)`` out, differentiable."""
    q = inputs.q
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"q: the Triton kernels need CUDA tensors (got a tensor on {q.device}); for CPU tensors "
                         "set TRITON_INTERPRET=1 before triton is imported")
    K, V = q.shape[-1], inputs.v.shape[-1]
    if K > 256 or V > 256:
        raise ValueError(f"q, v: the Triton kernels support head sizes K, V <= 256, got K = {K}, V = {V}")
    scale = K ** -0.5 if scale is None else scale
    init = inputs.initial_state
    S_init, M_init = (init if rule.momentum else (init, None)) if init is not None else (None, None)
    gates = [inputs.gates.get(name) for name in GATES]
    out = ChunkRuleFunction.apply(rule, scale, chunk_size, q, inputs.k, inputs.v, *gates, S_init, M_init)
    o, states = out[0], out[1:]
    if not output_final_state:
        return o, None
    return o, (tuple(states) if rule.momentum else states[0])


__all__ = ["triton_forward", "ChunkRuleFunction"]
