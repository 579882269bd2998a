"""The chunkwise-parallel form of every rule, in batched PyTorch (rules.md section 2).

One routine serves all six rules. The most general one, ``momentum_delta``, is

    M_t = m_t M_{t-1} + e_t k_t r_t^T,  r_t = S_{t-1}^T p_t - v_t,  S_t = a_t S_{t-1} - b_t M_t

with probe key ``p_t = a_t k_t``. The others pin gates: no momentum gate means ``mu = 0, eta = 1`` (no M
is carried), no decay gate means ``alpha = 1``, no beta means ``beta = 1``, and rules without the delta
correction use ``p_t = 0`` (then the pseudo-values are just ``V``).

Inside a chunk of ``C`` tokens with carry-in ``(S_0, M_0)``:

    La[t, i] = A_t / A_i,   Lm[i, j] = Mu_i / Mu_j          (lower triangular, from log-gate segment sums)
    Gamma    = La diag(beta) Lm                            (every exponent <= 0: stable for any mu, alpha)
    bM[t]    = sum_{i<=t} b_i (A_t / A_i) Mu_i
    U        = Tm (V - diag(A_{t-1}) P S_0 + diag(bM_{t-1}) P M_0),   Tm = (I + Amat)^-1 (unit lower triangular)
    o_t      = scale * (A_t S_0^T q_t - bM_t M_0^T q_t + sum_{j<=t} Gamma[t, j] (q_t . kk_j) u_j)
    S_C      = A_C S_0 - bM_C M_0 + (Gamma[C, :] * kk)^T U
    M_C      = Mu_C M_0 - (Lm[C, :] * kk)^T U

Everything that does not depend on the carried state is computed for all chunks at once; only the short
loop over chunks at the end is sequential. A zero carry-in (the first chunk without an initial state, the
whole sequence when it fits one chunk) skips the terms in ``S_0`` and ``M_0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Inputs, Rule, State, as_state, compute_dtype, initial_states


def segment_decay(log_cumsum: Tensor) -> Tensor:
    """``L[t, i] = exp(c_t - c_i)`` for ``i <= t`` and 0 above the diagonal, from a cumulative log gate ``c``.

    The upper triangle is filled with -inf *before* ``exp``: its exponents are positive and would overflow.
    """
    C = log_cumsum.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=log_cumsum.device).tril()
    diff = log_cumsum[..., :, None] - log_cumsum[..., None, :]
    return diff.masked_fill(~causal, float("-inf")).exp()


def diagonal_blocks(x: Tensor, size: int) -> Tensor:
    """The ``size x size`` blocks on the diagonal of ``x [..., C, C]``, as ``[..., C / size, size, size]`` (a view)."""
    count = x.shape[-1] // size
    blocks = x.unflatten(-1, (count, size)).unflatten(-3, (count, size))     # [..., n, size, n, size]
    return blocks.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)


def unit_lower_inverse(A: Tensor, base: int = 8) -> Tensor:
    """``(I + A)^-1`` for strictly lower-triangular ``A [..., C, C]`` (C a power of two), in a few batched matmuls.

    Forward substitution row by row inside ``base``-sized diagonal blocks (the accuracy of a triangular
    solve), then doubling: a block of twice the size has the inverse ``[[T11, 0], [-T22 A21 T11, T22]]``.
    Every block is written in place into one ``C x C`` result. On the CPU, with ``UnitLowerSolve``'s backward,
    this replaced ``torch.linalg.solve_triangular``, the largest single cost of a default training step
    (many small systems, slow and worse with 2 threads than with 1; BENCHMARKS.md, issue 12).
    """
    C = A.shape[-1]
    size = min(C, base)
    T = torch.zeros_like(A)
    T.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    A_blocks, T_blocks = diagonal_blocks(A, size), diagonal_blocks(T, size)
    for i in range(1, size):
        # Row i of T: e_i - A[i, :i] T[:i, :], where T[:i, :] is already final and zero beyond column i.
        T_blocks[..., i, :i] = -(A_blocks[..., i, None, :i] @ T_blocks[..., :i, :i])[..., 0, :]
    while size < C:
        A_pairs, T_pairs = diagonal_blocks(A, 2 * size), diagonal_blocks(T, 2 * size)
        T_pairs[..., size:, :size] = -(T_pairs[..., size:, size:] @ A_pairs[..., size:, :size] @ T_pairs[..., :size, :size])
        size *= 2
    return T


class UnitLowerSolve(torch.autograd.Function):
    """``U = (I + A)^-1 R`` for strictly lower-triangular ``A``, given ``T = (I + A)^-1`` computed without autograd.

    The gradient reaches ``A`` through the solve's own formula, not through the steps that built ``T``:
    ``dR = T^T dU`` and ``dA = -(dR U^T)`` on the strict lower part, two thin matmuls.
    """

    @staticmethod
    def forward(ctx, A: Tensor, T: Tensor, R: Tensor) -> Tensor:
        U = T @ R
        ctx.save_for_backward(T, U)
        return U

    @staticmethod
    def backward(ctx, grad_U: Tensor) -> tuple[Tensor, None, Tensor]:
        T, U = ctx.saved_tensors
        grad_R = T.mT @ grad_U
        # Only A's strict lower part enters the system (its diagonal is the unit one, above it zeros).
        return -(grad_R @ U.mT).tril(-1), None, grad_R


def shift_down(x: Tensor, dim: int, fill: float) -> Tensor:
    """``x[t-1]`` at position ``t`` along ``dim`` (a value for "before the chunk" at position 0)."""
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [1, 0]
    return F.pad(x, pad, value=fill).narrow(dim, 0, x.shape[dim])


def chunk_forward(rule: Rule, inputs: Inputs, scale: float | None, output_final_state: bool,
                  chunk_size: int) -> tuple[Tensor, State | None]:
    q, k, v = inputs.q, inputs.k, inputs.v
    B, T, H, K = q.shape
    dtype = compute_dtype(q)
    scale = K ** -0.5 if scale is None else scale
    C = chunk_size
    N = -(-T // C)

    def blocks(x: Tensor) -> Tensor:
        """[B, T, H, ...] -> [B, H, N, C, ...], zero-padded to whole chunks (zero gates leave states as they are)."""
        x = x.to(dtype)
        x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, N * C - T])
        x = x.reshape(B, N, C, H, *x.shape[3:])
        return x.movedim(3, 1)

    gates = inputs.gates
    ones = torch.ones(B, T, H, dtype=dtype, device=q.device)
    log_alpha = blocks(gates.get("log_alpha", torch.zeros_like(ones)))
    beta = blocks(gates.get("beta", ones))
    q, k, v = blocks(q), blocks(k), blocks(v)

    log_A = log_alpha.cumsum(-1)                                   # log A_t, [B, H, N, C]
    La = segment_decay(log_A)                                      # [B, H, N, C, C]
    if rule.momentum:
        log_Mu = blocks(gates["log_mu"]).cumsum(-1)
        Lm = segment_decay(log_Mu)
        Gamma = La @ (beta[..., :, None] * Lm)                     # La diag(beta) Lm
        bM = (La * (beta * log_Mu.exp())[..., None, :]).sum(-1)   # carry-in weight of M_0
        kk = blocks(gates["eta"])[..., None] * k
    else:
        Gamma = La * beta[..., None, :]                            # Lm = I
        kk = k

    if rule.delta:
        # (I + Amat) U = V - diag(A_{t-1}) P S_0 + diag(bM_{t-1}) P M_0, Amat[t, j] = Gamma[t-1, j] (p_t . kk_j)
        probe = log_alpha.exp()[..., None] * k
        Amat = shift_down(Gamma, dim=-2, fill=0.0) * (probe @ kk.transpose(-1, -2))
        with torch.no_grad():
            Tm = unit_lower_inverse(Amat)                          # UnitLowerSolve takes A's gradient
        probe_S = shift_down(log_A, dim=-1, fill=0.0).exp()[..., None] * probe
        if rule.momentum:
            probe_M = shift_down(bM, dim=-1, fill=0.0)[..., None] * probe

    scores = Gamma * (q @ kk.transpose(-1, -2))                    # intra-chunk attention, lower triangular
    A = log_A.exp()
    # None stands for a zero state: its terms are skipped rather than multiplied by zeros.
    S = M = None
    if inputs.initial_state is not None:
        S, *rest = initial_states(rule, inputs, dtype)
        M = rest[0] if rule.momentum else None
    outputs = []
    for n in range(N):
        U = v[:, :, n]
        if rule.delta:
            if S is not None:
                U = U - probe_S[:, :, n] @ S + (probe_M[:, :, n] @ M if rule.momentum else 0)
            U = UnitLowerSolve.apply(Amat[:, :, n], Tm[:, :, n], U)
        o = scores[:, :, n] @ U
        last = n == N - 1 and not output_final_state                # no carry out of the last chunk needed
        if not last:
            S_next = (Gamma[:, :, n, -1, :, None] * kk[:, :, n]).transpose(-1, -2) @ U
        if S is not None:
            o = o + (A[:, :, n, :, None] * q[:, :, n]) @ S
            if not last:
                S_next = S_next + A[:, :, n, -1, None, None] * S
        if rule.momentum:
            if M is not None:
                o = o - (bM[:, :, n, :, None] * q[:, :, n]) @ M
            if not last:
                decay_to_end = Lm[:, :, n, -1, :, None]            # Mu_C / Mu_j for every j
                M_next = -(decay_to_end * kk[:, :, n]).transpose(-1, -2) @ U
                if M is not None:
                    S_next = S_next - bM[:, :, n, -1, None, None] * M
                    M_next = M_next + log_Mu[:, :, n, -1].exp()[..., None, None] * M
                M = M_next
        outputs.append(scale * o)
        if not last:
            S = S_next

    o = torch.stack(outputs, dim=2)                                # [B, H, N, C, V]
    o = o.movedim(1, 3).reshape(B, N * C, H, -1)[:, :T].to(inputs.v.dtype)
    return o, (as_state(rule, (S, M) if rule.momentum else (S,)) if output_final_state else None)
