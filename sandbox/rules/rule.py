"""``Rule``: an update rule's name, gates, recurrence and one-token ``step``, and its three forms.

A rule is described by its gates and by one function, ``step``, that advances the state by one token.
Everything else (the readable loop, the chunkwise PyTorch form, the Triton kernels) is derived from the
rule's gates and its ``delta`` flag, so the six rules of ``rules.md`` section 1 share one implementation
of each algorithm. The forms (``naive``, the per-token loop; ``chunk``, the chunkwise PyTorch form; ``triton``, the kernels)
import their implementations when first called, and this module does not import torch: listing the rules
(``sandbox rules``) starts instantly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

if TYPE_CHECKING:
    from torch import Tensor

State = Union["Tensor", tuple["Tensor", "Tensor"]]

ALL_GATES = ("log_alpha", "beta", "log_mu", "eta")
# Everything except the Triton kernels is plain PyTorch, so the package installs without Triton where it has
# no wheels (macOS, Windows); only rule.triton then says so.
TRITON_MISSING = ("the triton package is not installed (it has wheels for Linux only: pip install triton); "
                  "rule.chunk computes the same in PyTorch")


def triton_installed() -> bool:
    """Whether the triton package imports here (the first import takes a second or two)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Rule:
    """One linear-attention update rule.

    name:       registry name, e.g. ``"momentum_delta"``.
    gates:      the per-token gates it takes, a subset of ``ALL_GATES`` in that order.
    delta:      whether the update corrects with the state's own prediction (probe key ``p_t = a_t k_t``)
                rather than accumulating ``k v^T`` blindly (``p_t = 0``).
    recurrence: one line, in the notation of rules.md.
    step:       ``step(state, k_t, v_t, **gates_t) -> state``, one token for all (batch, head) pairs;
                ``k_t: [B, H, K]``, ``v_t: [B, H, V]``, each gate ``[B, H]`` under its own name
                (``log_alpha`` is the log of the decay, as everywhere else).
    """

    name: str
    gates: tuple[str, ...]
    delta: bool
    recurrence: str
    step: Callable[..., State]

    @property
    def momentum(self) -> bool:
        """Rules with a momentum gate carry a second state ``M`` next to ``S``."""
        return "log_mu" in self.gates

    def naive(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
              initial_state: State | None = None, output_final_state: bool = False,
              **gates: Tensor) -> tuple[Tensor, State | None]:
        """The per-token loop: the definition every faster form is tested against."""
        from .base import check_inputs, naive_loop

        inputs = check_inputs(self, q, k, v, gates, initial_state)
        return naive_loop(self, inputs, scale, output_final_state)

    def chunk(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
              initial_state: State | None = None, output_final_state: bool = False,
              chunk_size: int = 64, **gates: Tensor) -> tuple[Tensor, State | None]:
        """The chunkwise-parallel form of rules.md section 2 in batched PyTorch."""
        from .base import check_chunk_size, check_inputs
        from .chunkwise import chunk_forward

        check_chunk_size(chunk_size, allowed=(8, 16, 32, 64, 128))
        inputs = check_inputs(self, q, k, v, gates, initial_state)
        return chunk_forward(self, inputs, scale, output_final_state, chunk_size)

    def triton(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
               initial_state: State | None = None, output_final_state: bool = False,
               chunk_size: int = 64, **gates: Tensor) -> tuple[Tensor, State | None]:
        """The chunkwise form as Triton kernels (forward and backward), see ``sandbox/kernels``."""
        try:
            from sandbox.kernels import triton_forward
        except ModuleNotFoundError as error:
            if error.name != "triton":
                raise
            raise ModuleNotFoundError(f"rule.triton: {TRITON_MISSING}", name="triton") from None

        from .base import check_chunk_size, check_inputs

        check_chunk_size(chunk_size, allowed=(16, 32, 64))
        inputs = check_inputs(self, q, k, v, gates, initial_state)
        return triton_forward(self, inputs, scale, output_final_state, chunk_size)
