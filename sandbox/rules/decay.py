"""``decay``: linear attention with a per-token forget gate (Mamba2 / RetNet style).

    S_t = a_t S_{t-1} + b_t k_t v_t^T               a_t = exp(log_alpha_t), b_t = beta_t

It is ``decay_momentum`` with ``mu -> 0``, ``eta = 1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .rule import Rule

if TYPE_CHECKING:
    from torch import Tensor


def step(S: Tensor, k: Tensor, v: Tensor, log_alpha: Tensor, beta: Tensor) -> Tensor:
    alpha = log_alpha.exp()[..., None, None]
    return alpha * S + beta[..., None, None] * k[..., :, None] * v[..., None, :]


RULE = Rule(name="decay", gates=("log_alpha", "beta"), delta=False, step=step,
            recurrence="S_t = a_t S_{t-1} + b_t k_t v_t^T")
