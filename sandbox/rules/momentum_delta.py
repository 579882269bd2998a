"""``momentum_delta``: MDN, heavy-ball momentum SGD on ``1/2 ||S^T k_t - v_t||^2``.

    r_t = a_t S_{t-1}^T k_t - v_t                   (the gradient's value part, at the decayed state)
    M_t = m_t M_{t-1} + e_t k_t r_t^T               (momentum: decay mu, gradient scale eta)
    S_t = a_t S_{t-1} - b_t M_t                     (step size beta, weight decay alpha)

with ``a = exp(log_alpha)``, ``m = exp(log_mu)``, ``b = beta``, ``e = eta``. The state is the pair (S, M).
With ``mu -> 0``, ``eta = 1`` it is ``gated_delta``. Chunkwise form and stability: rules.md sections 2-3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .rule import Rule

if TYPE_CHECKING:
    from torch import Tensor


def step(state: tuple[Tensor, Tensor], k: Tensor, v: Tensor, log_alpha: Tensor, beta: Tensor,
         log_mu: Tensor, eta: Tensor) -> tuple[Tensor, Tensor]:
    S, M = state
    alpha = log_alpha.exp()[..., None, None]
    residual = (k[..., None, :] @ (alpha * S))[..., 0, :] - v   # S^T k as [1, K] @ [K, V] per head
    M = log_mu.exp()[..., None, None] * M + eta[..., None, None] * k[..., :, None] * residual[..., None, :]
    S = alpha * S - beta[..., None, None] * M
    return S, M


RULE = Rule(name="momentum_delta", gates=("log_alpha", "beta", "log_mu", "eta"), delta=True, step=step,
            recurrence="r_t = a_t S_{t-1}^T k_t - v_t; M_t = m_t M_{t-1} + e_t k_t r_t^T; S_t = a_t S_{t-1} - b_t M_t")
