"""``gated_delta``: Gated DeltaNet (GDN), the delta rule applied to the decayed state.

    S_t = a_t S_{t-1} + b_t k_t (v_t - a_t S_{t-1}^T k_t)^T          a_t = exp(log_alpha_t)

One SGD step with weight decay: shrink the state by ``a_t``, then correct it towards ``v_t``.
It is ``momentum_delta`` with ``mu -> 0``, ``eta = 1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .rule import Rule

if TYPE_CHECKING:
    from torch import Tensor


def step(S: Tensor, k: Tensor, v: Tensor, log_alpha: Tensor, beta: Tensor) -> Tensor:
    decayed = log_alpha.exp()[..., None, None] * S
    error = v - (k[..., None, :] @ decayed)[..., 0, :]   # S^T k as [1, K] @ [K, V] per head
    return decayed + beta[..., None, None] * k[..., :, None] * error[..., None, :]


RULE = Rule(name="gated_delta", gates=("log_alpha", "beta"), delta=True, step=step,
            recurrence="S_t = a_t S_{t-1} + b_t k_t (v_t - a_t S_{t-1}^T k_t)^T")
