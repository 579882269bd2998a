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
    U        = u_c - y S_0 + z M_0                          (u_c, y, z from one unit-triangular solve)
    o_t      = scale * (A_t S_0^T q_t - bM_t M_0^T q_t + sum_{j<=t} Gamma[t, j] (q_t . kk_j) u_j)
    S_C      = A_C S_0 - bM_C M_0 + (Gamma[C, :] * kk)^T U
    M_C      = Mu_C M_0 - (Lm[C, :] * kk)^T U

Everything that does not depend on the carried state is computed for all chunks at once; only the short
loop over chunks at the end is sequential.
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
        rhs = [v, shift_down(log_A, dim=-1, fill=0.0).exp()[..., None] * probe]
        if rule.momentum:
            rhs.append(shift_down(bM, dim=-1, fill=0.0)[..., None] * probe)
        # unitriangular: the solver takes the diagonal as 1 and reads only Amat's strict lower part.
        solved = torch.linalg.solve_triangular(Amat, torch.cat(rhs, dim=-1), upper=False, unitriangular=True)
        u_c, y, z = solved.split([v.shape[-1], K, K if rule.momentum else 0], dim=-1)

    scores = Gamma * (q @ kk.transpose(-1, -2))                    # intra-chunk attention, lower triangular
    A = log_A.exp()
    S, *M = initial_states(rule, inputs, dtype)
    outputs = []
    for n in range(N):
        U = v[:, :, n]
        if rule.delta:
            U = u_c[:, :, n] - y[:, :, n] @ S + (z[:, :, n] @ M[0] if rule.momentum else 0)
        o = (A[:, :, n, :, None] * q[:, :, n]) @ S + scores[:, :, n] @ U
        S_next = A[:, :, n, -1, None, None] * S + (Gamma[:, :, n, -1, :, None] * kk[:, :, n]).transpose(-1, -2) @ U
        if rule.momentum:
            o = o - (bM[:, :, n, :, None] * q[:, :, n]) @ M[0]
            S_next = S_next - bM[:, :, n, -1, None, None] * M[0]
            Mu_C = log_Mu[:, :, n, -1].exp()[..., None, None]
            decay_to_end = Lm[:, :, n, -1, :, None]                # Mu_C / Mu_j for every j
            M = [Mu_C * M[0] - (decay_to_end * kk[:, :, n]).transpose(-1, -2) @ U]
        outputs.append(scale * o)
        S = S_next

    o = torch.stack(outputs, dim=2)                                # [B, H, N, C, V]
    o = o.movedim(1, 3).reshape(B, N * C, H, -1)[:, :T].to(inputs.v.dtype)
    return o, (as_state(rule, (S, *M)) if output_final_state else None)
