"""``delta``: DeltaNet, one step of online SGD on ``1/2 ||S^T k_t - v_t||^2`` per token.

    S_t = S_{t-1} + b_t k_t (v_t - S_{t-1}^T k_t)^T

``v_t - S_{t-1}^T k_t`` is what the state gets wrong about ``v_t``; ``beta`` is the step size.
It is ``gated_delta`` with ``alpha = 1``.
"""

import torch
from torch import Tensor

from .base import Rule


def step(S: Tensor, k: Tensor, v: Tensor, beta: Tensor) -> Tensor:
    error = v - torch.einsum("bhkv,bhk->bhv", S, k)
    return S + beta[..., None, None] * k[..., :, None] * error[..., None, :]


RULE = Rule(name="delta", gates=("beta",), delta=True, step=step,
            recurrence="S_t = S_{t-1} + b_t k_t (v_t - S_{t-1}^T k_t)^T")
