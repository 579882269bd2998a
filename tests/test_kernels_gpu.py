"""Triton chunk kernels on CUDA, bf16/fp16, long sequences, against float64 on the GPU (skipped without CUDA).

Buffers from ``torch.empty`` are NaN-filled during these tests, as on the CPU. The reference is ``rule.chunk`` in float64 (the per-token loop is too slow at T = 2048); that it equals the
loop to ~1e-12 is checked once at a short T. Each case prints one ``KERNEL-ERRORS`` line (run with ``-s``)
that ``scripts/gpu_kernel_check.py`` collects into its summary table.
"""

import pytest
import torch

from test_kernels import RULES, kernel_errors, outputs_and_grads, make_inputs, poisoned_empty, relative_rms  # noqa: F401
from sandbox.rules import get_rule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("poisoned_empty")]

# Relative RMS bounds for half-precision inputs (outputs rounded to bf16 alone cost ~2.3e-3).
OUTPUT_TOLERANCE = 5e-3          # o and final states
INPUT_GRAD_TOLERANCE = 1e-2      # q, k, v and initial-state gradients
GATE_GRAD_TOLERANCE = 2e-2       # gate gradients
FLOAT32_TOLERANCE = 1e-4         # float32 inputs: float32-accurate products (tf32x3) throughout
MOMENTUM_RULES = ["momentum_delta", "decay_momentum"]


def tolerance(name: str, dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return FLOAT32_TOLERANCE
    if name in ("o", "S", "M"):
        return OUTPUT_TOLERANCE
    if name in ("dq", "dk", "dv", "dS0", "dM0"):
        return INPUT_GRAD_TOLERANCE
    return GATE_GRAD_TOLERANCE


# delta with beta near 2 and no decay: the state is a product of near-reflections and forgets nothing, so
# rounding anywhere in the sequence stays in it. Measured in float64 (T = 1000, D = 128): relative noise of
# bf16 size on k moves o by 4.9e-3 there, against 1.5e-3 with beta in (0, 1) and 1.2e-3 for gated_delta
# with beta near 2. Half-precision bounds for that case are scaled by the same factor (float32 keeps 1e-4).
ILL_CONDITIONED = {("delta", "beta_near_two"): 4.0}


def check_on_gpu(rule_name, T, D, dtype, chunk_size, **regime):
    errors = kernel_errors(rule_name, B=2, T=T, H=4, K=D, V=D, dtype=dtype, chunk_size=chunk_size,
                           gate_dtype=torch.float32, device="cuda", reference="chunk", **regime)
    factor = 1.0 if dtype == torch.float32 else ILL_CONDITIONED.get((rule_name, next(iter(regime), None)), 1.0)
    tag = {"slow_state_fast_momentum": "mu<<alpha", "beta_near_two": "beta~2"}.get(next(iter(regime), None), "-")
    print(f"\nKERNEL-ERRORS {rule_name} T={T} D={D} {str(dtype)[6:]} C={chunk_size} {tag} "
          + " ".join(f"{name}={error:.1e}" for name, error in errors.items()))
    for name, error in errors.items():
        assert error <= factor * tolerance(name, dtype), \
            f"{rule_name} T={T} D={D} {dtype} C={chunk_size}: {name} {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 100, 128])
@pytest.mark.parametrize("T", [63, 1000, 2048])
@pytest.mark.parametrize("rule_name", RULES)
def test_gpu_kernels_chunk64(rule_name, T, D, dtype):
    check_on_gpu(rule_name, T, D, dtype, chunk_size=64)


@pytest.mark.parametrize("chunk_size", [16, 32])
@pytest.mark.parametrize("rule_name", RULES)
def test_gpu_kernels_small_chunks(rule_name, chunk_size):
    check_on_gpu(rule_name, T=1000, D=100, dtype=torch.bfloat16, chunk_size=chunk_size)


@pytest.mark.parametrize("rule_name", RULES)
def test_gpu_kernels_float32(rule_name):
    check_on_gpu(rule_name, T=300, D=64, dtype=torch.float32, chunk_size=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [16, 32])
@pytest.mark.parametrize("rule_name", RULES)
def test_gpu_kernels_small_heads(rule_name, D, dtype):
    """The head sizes the tiny models train with (d_model 128 / 4 heads = 32) and the layer's self-test (16)."""
    check_on_gpu(rule_name, T=81, D=D, dtype=dtype, chunk_size=64)


@pytest.mark.parametrize("rule_name", ["gated_delta", "momentum_delta"])
def test_gpu_kernels_largest_heads(rule_name):
    check_on_gpu(rule_name, T=200, D=256, dtype=torch.bfloat16, chunk_size=64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rule_name", MOMENTUM_RULES)
def test_gpu_kernels_momentum_much_faster_than_state_decay(rule_name, dtype):
    check_on_gpu(rule_name, T=1000, D=128, dtype=dtype, chunk_size=64, slow_state_fast_momentum=True)


@pytest.mark.parametrize("dtype, T, D, chunk_size", [(torch.bfloat16, 1000, 128, 64), (torch.float16, 1000, 100, 16),
                                                     (torch.float32, 300, 64, 64)], ids=["bf16", "fp16-C16", "fp32"])
@pytest.mark.parametrize("rule_name", ["delta", "gated_delta", "momentum_delta"])
def test_gpu_kernels_beta_near_two(rule_name, dtype, T, D, chunk_size):
    """beta in (1.9, 2): the negative-eigenvalue range of the delta rules."""
    check_on_gpu(rule_name, T=T, D=D, dtype=dtype, chunk_size=chunk_size, beta_near_two=True)


@pytest.mark.parametrize("rule_name", RULES)
def test_gpu_float64_chunk_reference_equals_naive(rule_name):
    """Licenses ``rule.chunk`` in float64 as the reference of the long cases above."""
    rule = get_rule(rule_name)
    inputs = make_inputs(rule, 2, 100, 4, 64, 64, torch.float64)
    chunk = outputs_and_grads(rule, rule.chunk, *inputs, torch.float64, True, "cuda", chunk_size=64)
    naive = outputs_and_grads(rule, rule.naive, *inputs, torch.float64, True, "cuda")
    for out, ref in zip(chunk[0] + chunk[1], naive[0] + naive[1]):
        assert relative_rms(out, ref) <= 1e-10
