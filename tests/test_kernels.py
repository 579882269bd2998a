"""Triton chunk kernels against the float64 per-token loop; on CPU they run under the Triton interpreter.

Every case checks the output, the final state(s) and the gradients of q, k, v, every gate and the initial
state(s) for the loss ``sum(o * dO) + sum(S * dS) [+ sum(M * dM)]`` with random dO, dS, dM. Buffers from
``torch.empty`` are NaN-filled during these tests so that a kernel reading memory nobody wrote shows up.
"""

import pytest
import torch
import torch.nn.functional as F

from sandbox.rules import get_rule

RULES = ["linear", "decay", "delta", "gated_delta", "momentum_delta", "decay_momentum"]

# Inside the kernels everything is float32. float32 inputs: only float32 rounding (observed <= ~1.5e-6).
# float16 inputs: o and the gradients are returned in float16, whose unit roundoff is 4.9e-4; 2e-3 leaves
# room for that rounding while any real mistake in the kernels is orders of magnitude larger.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3}


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make every floating ``torch.empty``/``torch.empty_like`` NaN-filled, so unwritten outputs fail."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_filled(x: torch.Tensor) -> torch.Tensor:
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: nan_filled(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: nan_filled(empty_like(*args, **kwargs)))


def make_inputs(rule, B, T, H, K, V, dtype, gate_dtype=None, seed=0, slow_state_fast_momentum=False,
                beta_near_two=False):
    """Unit-norm keys (as the layer feeds them) and gates in their usual ranges; optional regimes: mu << alpha,
    and beta in (1.9, 2) (negative eigenvalues: the delta update I - beta k k^T reflects along k)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)
    q = torch.randn(B, T, H, K, generator=g)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    ranges = {"log_alpha": -rand(B, T, H) * (0.05 if slow_state_fast_momentum else 0.5),
              "beta": 2 - 0.1 * rand(B, T, H) if beta_near_two else rand(B, T, H),
              "log_mu": -(1 + rand(B, T, H)) if slow_state_fast_momentum else -rand(B, T, H),
              "eta": 2 * rand(B, T, H)}
    gates = {name: ranges[name].to(gate_dtype or dtype) for name in rule.gates}
    count = 2 if rule.momentum else 1
    states = tuple(torch.randn(B, H, K, V, generator=g) for _ in range(count))
    return q.to(dtype), k.to(dtype), v.to(dtype), gates, states


def outputs_and_grads(rule, fn, q, k, v, gates, states, dtype, with_state, device="cpu", **kwargs):
    """Run ``fn`` on copies cast to ``dtype`` (gates keep theirs unless dtype is float64); return the outputs
    and the gradients of every input, for a loss with fixed random weights on every output."""
    gate_cast = lambda x: x.to(torch.float64) if dtype == torch.float64 else x
    leaves = [x.detach().to(device, dtype).requires_grad_() for x in (q, k, v)]
    leaves += [gate_cast(x.detach().to(device)).requires_grad_() for x in gates.values()]
    initial = [s.detach().to(device, dtype).requires_grad_() for s in states] if with_state else []
    initial_state = None
    if with_state:
        initial_state = tuple(initial) if rule.momentum else initial[0]
    qq, kk, vv, *gg = leaves
    o, final = fn(qq, kk, vv, initial_state=initial_state, output_final_state=with_state,
                  **dict(zip(gates, gg)), **kwargs)
    finals = (list(final) if rule.momentum else [final]) if with_state else []
    g = torch.Generator().manual_seed(1)
    weight = lambda x: torch.randn(x.shape, generator=g, dtype=torch.float64).to(device)
    loss = sum((x.double() * weight(x)).sum() for x in [o, *finals])
    grads = torch.autograd.grad(loss, leaves + initial)
    return [o, *finals], list(grads)


def relative_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def kernel_errors(rule_name, B, T, H, K, V, dtype, chunk_size, with_state=True, gate_dtype=None, device="cpu",
                  reference="naive", **regime):
    """Relative RMS error of every output and gradient of ``rule.triton`` against a float64 reference.

    Returns ``{name: error}`` with names o, S, M, dq, dk, dv, d<gate>, dS0, dM0; also checks the dtypes
    (o and gradients in their input's dtype, final states float32) and that everything is finite.
    """
    rule = get_rule(rule_name)
    q, k, v, gates, states = make_inputs(rule, B, T, H, K, V, dtype, gate_dtype=gate_dtype, **regime)
    outs, grads = outputs_and_grads(rule, rule.triton, q, k, v, gates, states, dtype, with_state, device,
                                    chunk_size=chunk_size)
    reference_fn = rule.naive if reference == "naive" else rule.chunk
    ref_outs, ref_grads = outputs_and_grads(rule, reference_fn, q, k, v, gates, states, torch.float64,
                                            with_state, device)
    names = ["o", "S", "M"][:len(outs)] + ["dq", "dk", "dv", *(f"d{n}" for n in gates), "dS0", "dM0"][:len(grads)]
    input_dtypes = [dtype] * 3 + [x.dtype for x in gates.values()] + [dtype] * 2
    expected_dtypes = [dtype, torch.float32, torch.float32][:len(outs)] + input_dtypes[:len(grads)]
    errors = {}
    for name, out, ref, expected_dtype in zip(names, outs + grads, ref_outs + ref_grads, expected_dtypes):
        assert out.dtype == expected_dtype, f"{rule_name}: {name} is {out.dtype}, expected {expected_dtype}"
        assert torch.isfinite(out).all(), f"{rule_name}: {name} has non-finite values"
        errors[name] = relative_rms(out, ref)
    return errors


def check_against_naive(rule_name, B, T, H, K, V, dtype, chunk_size, **options):
    errors = kernel_errors(rule_name, B, T, H, K, V, dtype, chunk_size, **options)
    for name, error in errors.items():
        assert error <= TOLERANCE[dtype], f"{rule_name} T={T} C={chunk_size}: {name} relative RMS {error:.2e}"


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T, chunk_size", [(1, 16), (50, 16), (64, 64), (130, 64)])
@pytest.mark.parametrize("rule_name", RULES)
def test_kernels_match_naive(rule_name, T, chunk_size, dtype):
    check_against_naive(rule_name, B=2, T=T, H=2, K=20, V=12, dtype=dtype, chunk_size=chunk_size)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("rule_name", ["gated_delta", "momentum_delta", "decay_momentum"])
def test_kernels_wide_odd_heads(rule_name):
    """Head sizes that are not powers of two and differ (masked tiles, two K tiles in the backward), chunk 32."""
    check_against_naive(rule_name, B=1, T=40, H=1, K=100, V=60, dtype=torch.float32, chunk_size=32)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("rule_name", ["momentum_delta", "decay_momentum"])
def test_kernels_momentum_much_faster_than_state_decay(rule_name):
    """mu << alpha inside a chunk of 64: where the prefix-sum form of the paper cancels to garbage."""
    check_against_naive(rule_name, B=2, T=130, H=2, K=20, V=12, dtype=torch.float32, chunk_size=64,
                        slow_state_fast_momentum=True)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("rule_name", ["delta", "gated_delta", "momentum_delta"])
def test_kernels_beta_near_two(rule_name):
    """beta in (1.9, 2), the negative-eigenvalue range of the delta rules: nothing in the kernels assumes
    beta <= 1 (no log(1 - beta)); the triangular solve then has entries near 2 below its unit diagonal."""
    check_against_naive(rule_name, B=2, T=130, H=2, K=20, V=12, dtype=torch.float32, chunk_size=64,
                        beta_near_two=True)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("rule_name", RULES)
def test_kernels_without_states(rule_name):
    """No initial state and no final state: only o, and gradients of q, k, v and the gates."""
    check_against_naive(rule_name, B=1, T=50, H=2, K=20, V=12, dtype=torch.float32, chunk_size=16,
                        with_state=False)


def test_kernels_return_types_and_final_state_dtype():
    rule = get_rule("momentum_delta")
    q, k, v, gates, states = make_inputs(rule, 1, 5, 1, 16, 16, torch.float16)
    o, (S, M) = rule.triton(q, k, v, initial_state=states, output_final_state=True, chunk_size=16, **gates)
    assert o.dtype == torch.float16 and S.dtype == M.dtype == torch.float32
    o, final = rule.triton(q, k, v, chunk_size=16, **gates)
    assert final is None and o.shape == v.shape


def test_kernels_reject_heads_above_256():
    rule = get_rule("linear")
    q = torch.zeros(1, 2, 1, 300)
    with pytest.raises(ValueError, match="K, V <= 256"):
        rule.triton(q, q, q)
