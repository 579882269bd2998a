"""``decay_momentum``: the second-order (momentum) filter without the delta correction.

    M_t = m_t M_{t-1} - e_t k_t v_t^T
    S_t = a_t S_{t-1} - b_t M_t

``-k_t v_t^T`` plays the gradient's part, so S accumulates a momentum-smoothed ``k v^T``.
With ``mu -> 0``, ``eta = 1`` it is ``decay``; it is ``momentum_delta`` with the probe key set to zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .rule import Rule

if TYPE_CHECKING:
    from torch import Tensor


def step(state: tuple[Tensor, Tensor], k: Tensor, v: Tensor, log_alpha: Tensor, beta: Tensor,
         log_mu: Tensor, eta: Tensor) -> tuple[Tensor, Tensor]:
    S, M = state
    M = log_mu.exp()[..., None, None] * M - eta[..., None, None] * k[..., :, None] * v[..., None, :]
    S = log_alpha.exp()[..., None, None] * S - beta[..., None, None] * M
    return S, M


RULE = Rule(name="decay_momentum", gates=("log_alpha", "beta", "log_mu", "eta"), delta=False, step=step,
            recurrence="M_t = m_t M_{t-1} - e_t k_t v_t^T; S_t = a_t S_{t-1} - b_t M_t")
