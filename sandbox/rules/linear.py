"""``linear``: plain linear attention, the state accumulates every key-value outer product.

    S_t = S_{t-1} + k_t v_t^T                       o_t = scale * S_t^T q_t

No gates. It is ``decay`` with ``alpha = beta = 1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .rule import Rule

if TYPE_CHECKING:
    from torch import Tensor


def step(S: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return S + k[..., :, None] * v[..., None, :]


RULE = Rule(name="linear", gates=(), delta=False, step=step,
            recurrence="S_t = S_{t-1} + k_t v_t^T")
