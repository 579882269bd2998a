"""``delta``: DeltaNet, one step of online SGD on ``1/2 ||S^T k_t - v_t||^2`` per token.

    S_t = S_{t-1} + b_t k_t (v_t - S_{t-1}^T k_t)^T

``v_t - S_{t-1}^T k_t`` is what the state gets wrong about ``v_t``; ``beta`` is the step size.
It is ``gated_delta`` with ``alpha = 1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .rule import Rule

if TYPE_CHECKING:
    from torch import Tensor


def step(S: Tensor, k: Tensor, v: Tensor, beta: Tensor) -> Tensor:
    error = v - (k[..., None, :] @ S)[..., 0, :]   # S^T k as [1, K] @ [K, V] per head
    return S + beta[..., None, None] * k[..., :, None] * error[..., None, :]


RULE = Rule(name="delta", gates=("beta",), delta=True, step=step,
            recurrence="S_t = S_{t-1} + b_t k_t (v_t - S_{t-1}^T k_t)^T")
