"""The named initialisations of the decay gates (``--decay-init``, ``--momentum-init``).

Kept apart from ``sandbox.layer`` so that the run config and the command line can list and check the names
without importing torch (``sandbox --help`` starts in well under a second).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from torch import Tensor


class DecayInit(NamedTuple):
    """Initial per-head decay rate ``A ~ U(A_low, A_high)`` and time step ``dt`` log-uniform in [dt_low, dt_high].

    At initialisation a head keeps ``exp(-A dt)`` of its state per token (the projection's input adds little
    around ``dt_bias``), so its memory half-life is about ``ln 2 / (A dt)`` tokens.
    """

    A_low: float
    A_high: float
    dt_low: float
    dt_high: float
    about: str

    def sample(self, heads: int) -> tuple[Tensor, Tensor]:
        import torch   # here, so that the CLI and config can name the inits without importing torch

        A = torch.empty(heads).uniform_(self.A_low, self.A_high).clamp_(min=1e-4)
        dt = torch.exp(torch.empty(heads).uniform_(math.log(self.dt_low), math.log(self.dt_high)))
        return A, dt

    def half_lives(self) -> tuple[float, float]:
        """Shortest and longest half-life in tokens that this init can draw (A > 0 clamped at 1e-4)."""
        return math.log(2) / (self.A_high * self.dt_high), math.log(2) / (max(self.A_low, 1e-4) * self.dt_low)


DECAY_INITS = {
    "mamba2": DecayInit(0.0, 16.0, 1e-3, 0.1, "Mamba2 / MDN / fla: A ~ U(0, 16), dt log-uniform in [1e-3, 0.1]; "
                        "half-lives from under one token to thousands, half of the heads under ~10 tokens"),
    "slow": DecayInit(1.0, 1.0, 1e-3, 1e-2, "A = 1, dt log-uniform in [1e-3, 1e-2]; every head starts with "
                      "a half-life of 69 to 693 tokens and learns to forget faster where that helps"),
}
# Chosen by measurement (docs/results/decay_init.md, one H100, 3 seeds): on MQAR at d_model 64, gated_delta with
# the mamba2 init solved 0 of 6 seeds, with slow 3 of 6; slow was never worse in mean. Not significant at 3 seeds.
DEFAULT_DECAY_INIT = "slow"
DEFAULT_MOMENTUM_INIT = "mamba2"
