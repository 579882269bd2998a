"""``gated_delta``: Gated DeltaNet (GDN), the delta rule applied to the decayed state.

    S_t = a_t S_{t-1} + b_t k_t (v_t - a_t S_{t-1}^T k_t)^T          a_t = exp(log_alpha_t)

One SGD step with weight decay: shrink the state by ``a_t``, then correct it towards ``v_t``.
It is ``momentum_delta`` with ``mu -> 0``, ``eta = 1``.
"""

import torch
from torch import Tensor

from .base import Rule


def step(S: Tensor, k: Tensor, v: Tensor, log_alpha: Tensor, beta: Tensor) -> Tensor:
    decayed = log_alpha.exp()[..., None, None] * S
    error = v - torch.einsum("bhkv,bhk->bhv", decayed, k)
    return decayed + beta[..., None, None] * k[..., :, None] * error[..., None, :]


RULE = Rule(name="gated_delta", gates=("log_alpha", "beta"), delta=True, step=step,
            recurrence="S_t = a_t S_{t-1} + b_t k_t (v_t - a_t S_{t-1}^T k_t)^T")
