"""Triton chunk kernels (forward and backward) for every rule, behind ``rule.triton(...)``.

``triton_forward`` runs the kernels of ``chunk.py`` through one ``torch.autograd.Function``; its backward is
the hand-derived chunkwise backward (``chunk.py``), never autograd through a reference. The gate glue (casts,
padding, chunk-local cumsums and their reverse) is one kernel each way (``gates.py``); what is left here is
buffer set-up: about five launches forward and six backward.

Layout ``[B, T, H, D]``; gates are handled as float32 ``[B * H, N * C]`` (padded to whole chunks with
log-gates 0 and beta = eta = 0, which leaves the states unchanged); initial and final states float32
``[B, H, K, V]``; between the kernels U and the per-chunk states in bfloat16 for bfloat16 inputs with head
sizes up to 128, float32 otherwise.
On CPU tensors the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), slowly but exactly in float32.
"""

from __future__ import annotations

import os

import torch
import triton
from torch import Tensor

from sandbox.rules.base import Inputs, Rule, State

from .chunk import (backward_chunk_kernel, backward_intra_kernel, backward_matrices_kernel, backward_scan_kernel,
                    forward_output_kernel, forward_scan_kernel, prepare_kernel)
from .gates import gates_backward_kernel, gates_forward_kernel

GATES = ("log_alpha", "beta", "log_mu", "eta")


def _chunk_gates(gates: list[Tensor | None], chunks: int, C: int, switches: dict) -> list[Tensor | None]:
    """The gates ``[B, T, H]`` -> float32 ``[B * H, N * C]``, zero-padded, log gates as chunk-local cumsums,
    then, with momentum, the chunks' ``bMs`` and ``Gamma[C, :]`` rows (``gates.py``), in one launch."""
    present = [g for g in gates if g is not None]
    if not present:
        return [None] * (len(gates) + 2)
    B, T, H = present[0].shape
    gates = [None if g is None else g.contiguous() for g in gates]

    def buffer():
        return torch.empty(B * H, chunks * C, device=present[0].device, dtype=torch.float32)
    out = [None if g is None else buffer() for g in gates]
    carry = [buffer(), buffer()] if switches["MOMENTUM"] else [None, None]
    gates_forward_kernel[(chunks, B * H)](*gates, *out, *carry, T, H, chunks, C=C, **switches)
    return out + carry


def _gate_grads(vec: Tensor, mat: Tensor | None, chunked: list[Tensor | None], gates: list[Tensor | None],
                C: int, k_tiles: int, switches: dict) -> list[Tensor | None]:
    """The kernels' two shares of the gate gradients (``chunk.py``: per-K-tile vectors ``vec``, the matrix
    share ``mat``) -> ``[B, T, H]`` in each gate's dtype, in one launch (``gates.py``). ``chunked``: the
    forward's float32 chunked gates."""
    present = [g for g in gates if g is not None]
    if not present:
        return [None] * len(gates)
    B, T, H = present[0].shape
    chunks = vec.shape[-1] // C
    grads = [None if g is None else torch.empty(B, T, H, device=g.device, dtype=g.dtype) for g in gates]
    gates_backward_kernel[(chunks, B * H)](vec, mat, *chunked, *grads, T, H, chunks, k_tiles, C=C, **switches)
    return grads


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
                "backward_scan": {"BK": BK, "BV": BV}, "backward_matrices": {"BK": BK, "BV": BV},
                "backward_chunk": {"BK": min(BK, 64), "BV": BV}}
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
        if switches["MOMENTUM"] and not switches["DELTA"]:
            backward_scan.update(BV=min(V_pow2, 64), num_warps=8)
    # The per-chunk backward holds many C x K and C x C accumulators: K in tiles of at most 64, and 8 warps
    # (fewer registers each) once decay or the delta correction adds theirs.
    backward_chunk = {"BK": min(BK, 64), "BV": BV, "num_warps": 4, "num_stages": 2}
    # (Not on 16-wide tiles: with 8 warps there the momentum backward faulted on the H100, K = 16 in float32.)
    if (switches["DECAY"] or switches["DELTA"]) and BK >= 32:
        backward_chunk.update(num_warps=8, num_stages=1)
    forward_output = {"BK": BK, "BV": BV_out, **plain}
    if q.dtype == torch.bfloat16 and 64 <= BK <= 128:
        # bf16 operands (half the registers and shared memory of float32 ones) moved the best options; the
        # fastest per rule and kernel of H100 sweeps at K = V = 128 (BENCHMARKS.md, kernel versions, v4 and v7).
        wide = min(V_pow2, 64)
        forward_output.update(BV=min(V_pow2, 128))
        if not switches["DELTA"] and not switches["MOMENTUM"]:            # linear, decay
            backward_chunk.update(BV=wide, num_stages=2)
            forward_scan.update(BV=wide, num_warps=8)
            if not switches["DECAY"]:
                backward_scan.update(num_stages=2)
        elif not switches["MOMENTUM"]:                                    # delta, gated_delta
            backward_chunk.update(num_stages=2)
        elif switches["DELTA"]:                                           # momentum_delta
            backward_chunk.update(BV=wide, num_stages=2)
            forward_scan.update(BV=min(V_pow2, 16))
            backward_scan.update(num_stages=2)
        else:                                                             # decay_momentum
            backward_chunk.update(num_stages=2)
            forward_scan.update(num_stages=2)
            backward_scan.update(num_stages=2)
    return {"PREC": prec, "prepare": {"BK": BK, **plain}, "forward_scan": forward_scan,
            "forward_output": forward_output, "backward_intra": {"BK": BK, "BV": BV_out, **plain},
            # (4 warps: faster than 8 at K = 128, and with 8 the momentum rules faulted at K = 16 in float32)
            "backward_matrices": {"BK": BK, "BV": BV_out, **plain},
            "backward_scan": backward_scan, "backward_chunk": backward_chunk}


def _between_kernels_dtype(q: Tensor, K: int, V: int) -> torch.dtype:
    """Storage of U and of the per-chunk states and their gradients between kernels.

    bfloat16 for bfloat16 inputs with head sizes up to 128 (half the memory and traffic; the rounding, 2^-9
    relative, is that of the inputs themselves, and the products read them as bf16 tensor-core operands);
    float32 otherwise: float16's range is too narrow for states and their gradients, float32 inputs get
    float32 accuracy, and at head size 256 (256-row K tiles, 16-wide V tiles) the bf16 operands faulted and
    gave wrong outputs on the H100 (Triton 3.6), where the float32 ones pass.
    """
    return torch.bfloat16 if q.dtype == torch.bfloat16 and max(K, V) <= 128 else torch.float32


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
        switches = {"DECAY": log_alpha is not None, "BETA": beta is not None, "MOMENTUM": rule.momentum}
        gA, b, gM, e, bms, gc = _chunk_gates([log_alpha, beta, log_mu, eta], N, C, switches)
        cfg = _launch_config(q, K, V, {**switches, "DELTA": rule.delta})
        f32 = {"device": q.device, "dtype": torch.float32}
        kept = {"device": q.device, "dtype": _between_kernels_dtype(q, K, V)}
        S_init = None if S_init is None else S_init.float().contiguous()
        M_init = None if M_init is None else M_init.float().contiguous()
        save = any(ctx.needs_input_grad)

        tm = None
        if rule.delta:
            tm = torch.empty(B * H, N, C, C, **f32)
            prepare_kernel[(N, B * H)](k, gA, b, gM, e, tm, T, H, K, N, C=C, **switches, **cfg["prepare"])
        u = torch.empty(B, T, H, V, **kept) if rule.delta else v
        s_chunks = torch.empty(B * H, N, K, V, **kept)
        m_chunks = torch.empty(B * H, N, K, V, **kept) if rule.momentum else None
        S_out = torch.empty(B, H, K, V, **f32)
        M_out = torch.empty(B, H, K, V, **f32) if rule.momentum else None
        grid = (triton.cdiv(V, cfg["forward_scan"]["BV"]), B * H)
        forward_scan_kernel[grid](k, v, gA, b, gM, e, bms, gc, tm, S_init, M_init, u, s_chunks, m_chunks, S_out, M_out,
                                  T, H, K, V, N, C=C, DELTA=rule.delta, HAS_INITIAL=S_init is not None,
                                  PREC=cfg["PREC"], **switches, **cfg["forward_scan"])
        o = torch.empty_like(v)
        grid = (N, B * H, triton.cdiv(V, cfg["forward_output"]["BV"]))
        forward_output_kernel[grid](q, k, u, gA, b, gM, e, bms, s_chunks, m_chunks, o, scale, T, H, K, V, N, C=C,
                                    PREC=cfg["PREC"], **switches, **cfg["forward_output"])
        if not save:
            u = s_chunks = m_chunks = None

        ctx.save_for_backward(q, k, v, gA, b, gM, e, bms, gc, tm, u, s_chunks, m_chunks, log_alpha, beta, log_mu, eta,
                              S_init, M_init)
        ctx.rule, ctx.scale, ctx.C, ctx.cfg, ctx.switches = rule, scale, C, cfg, switches
        ctx.set_materialize_grads(False)
        return (o, S_out, M_out) if rule.momentum else (o, S_out)

    @staticmethod
    def backward(ctx, do: Tensor, dS_final: Tensor | None, dM_final: Tensor | None = None):
        (q, k, v, gA, b, gM, e, bms, gc, tm, u, s_chunks, m_chunks, log_alpha, beta, log_mu, eta,
         S_init, M_init) = ctx.saved_tensors
        rule, scale, C, cfg, switches = ctx.rule, ctx.scale, ctx.C, ctx.cfg, ctx.switches
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = triton.cdiv(T, C)
        f32 = {"device": q.device, "dtype": torch.float32}
        kept = {"device": q.device, "dtype": _between_kernels_dtype(q, K, V)}
        if do is None:
            do = torch.zeros_like(v)
        do = do.contiguous()
        has_dfinal = dS_final is not None or dM_final is not None
        if has_dfinal:
            dS_final = torch.zeros(B, H, K, V, **f32) if dS_final is None else dS_final.float().contiguous()
            if rule.momentum:
                dM_final = torch.zeros(B, H, K, V, **f32) if dM_final is None else dM_final.float().contiguous()

        dr = torch.empty(B, T, H, V, **f32)
        ds_chunks = torch.empty(B * H, N, K, V, **kept)
        dm_chunks = torch.empty(B * H, N, K, V, **kept) if rule.momentum else None
        dS_init = torch.empty(B, H, K, V, **f32)
        dM_init = torch.empty(B, H, K, V, **f32) if rule.momentum else None
        dw = torch.empty(B * H, N, C, C, **f32)
        backward_intra_kernel[(N, B * H)](q, k, u, do, gA, b, gM, e, dr, dw, scale, T, H, K, V, N, C=C,
                                          PREC=cfg["PREC"], **switches, **cfg["backward_intra"])
        grid = (triton.cdiv(V, cfg["backward_scan"]["BV"]), B * H)
        backward_scan_kernel[grid](q, k, do, gA, b, gM, e, bms, gc, tm, dS_final, dM_final, dr, ds_chunks, dm_chunks,
                                   dS_init, dM_init, scale, T, H, K, V, N, C=C, DELTA=rule.delta,
                                   HAS_DFINAL=has_dfinal, PREC=cfg["PREC"], **switches, **cfg["backward_scan"])

        # The C x C side once per chunk: dW becomes P = dW o Gamma in place, Qm = dAmat o Gs, and the matrix
        # share of the gate gradients.
        # (Without gates, linear, backward_intra has written P already.)
        qm = torch.empty(B * H, N, C, C, **f32) if rule.delta else None
        has_gates = any(g is not None for g in (gA, b, gM))
        mat = torch.empty(4, B * H, N * C, **f32) if has_gates else None
        if has_gates or rule.delta:
            backward_matrices_kernel[(N, B * H)](q, k, u, dr, gA, b, gM, e, dw, qm, mat, T, H, K, V, N, C=C,
                                                 DELTA=rule.delta, PREC=cfg["PREC"], **switches,
                                                 **cfg["backward_matrices"])

        # dq, dk, dv straight in the inputs' dtypes (dR stays float32: backward_chunk reads it).
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = dr if v.dtype == torch.float32 else torch.empty_like(v)
        k_tiles = triton.cdiv(K, cfg["backward_chunk"]["BK"])
        # The vector gradients of backward_chunk, a plane each: d(A_t), d(Gamma[C, :]), and with momentum
        # d(bM_t), d(bMs_t), d(Lm[C, :]), d(Mu_C), d(eta).
        vec_planes = 7 if rule.momentum else 2
        vec = torch.empty(k_tiles, vec_planes, B * H, N * C, **f32)
        backward_chunk_kernel[(N * k_tiles, B * H)](q, k, u, do, gA, b, gM, e, bms, gc, dr, dw, qm,
                                                    s_chunks, m_chunks, ds_chunks, dm_chunks, dq, dk, dv, vec,
                                                    scale, T, H, K, V, N, C=C, DELTA=rule.delta,
                                                    STORE_DV=dv is not dr, VEC_PLANES=vec_planes, PREC=cfg["PREC"],
                                                    **switches, **cfg["backward_chunk"])
        grads = _gate_grads(vec, mat, [gA, b, gM, e], [log_alpha, beta, log_mu, eta], C, k_tiles,
                            {**switches, "VEC_PLANES": vec_planes, "PREC": cfg["PREC"]})
        dS_init_out = None if S_init is None else dS_init
        dM_init_out = None if M_init is None else dM_init
        return (None, None, None, dq, dk, dv, *grads, dS_init_out, dM_init_out)


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
