"""The rules' definitions: chunk form against the float64 loop, identities, gradcheck, bad input, registry."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from sandbox.cli import app
from sandbox.rules import Rule, get_rule, list_rules, register_rule, unregister_rule

RULES = ["linear", "decay", "delta", "gated_delta", "momentum_delta", "decay_momentum"]
MOMENTUM_RULES = ["momentum_delta", "decay_momentum"]

# (log_alpha range, log_mu range): gates drawn as -U(lo, hi)
REGIMES = {
    "default": ((0.0, 0.5), (0.0, 0.5)),
    "mu_much_smaller": ((0.0, 0.05), (1.0, 2.0)),  # the published chunk algorithm returns NaN here
    "alpha_much_smaller": ((1.0, 2.0), (0.0, 0.05)),
    "both_near_one": ((0.0, 0.01), (0.0, 0.01)),
}


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def make_inputs(rule: Rule, B: int = 2, T: int = 17, H: int = 2, K: int = 8, V: int = 12,
                regime: str = "default", seed: int = 0) -> dict:
    """Random float64 inputs (l2-normalised keys, gates in the given regime) and a nonzero initial state."""
    g = torch.Generator().manual_seed(seed)
    alpha_range, mu_range = REGIMES[regime]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(B, T, H, generator=g, dtype=torch.float64)

    gates = {
        "log_alpha": -uniform(*alpha_range),
        "beta": uniform(0.1, 1.0),
        "log_mu": -uniform(*mu_range),
        "eta": uniform(0.1, 1.9),
    }
    state_count = 2 if rule.momentum else 1
    states = [0.5 * torch.randn(B, H, K, V, generator=g, dtype=torch.float64) for _ in range(state_count)]
    return {
        "q": torch.randn(B, T, H, K, generator=g, dtype=torch.float64),
        "k": torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.float64), dim=-1),
        "v": torch.randn(B, T, H, V, generator=g, dtype=torch.float64),
        "gates": {name: gates[name] for name in rule.gates},
        "initial_state": tuple(states) if rule.momentum else states[0],
    }


def run_with_grads(fn, inputs: dict, dtype: torch.dtype, seed: int = 1, **kwargs) -> dict:
    """Call ``fn`` on leaf copies of the inputs in ``dtype``; return outputs and every input gradient (float64)."""
    leaves = {name: inputs[name].detach().to(dtype).requires_grad_() for name in ("q", "k", "v")}
    gates = {name: g.detach().to(dtype).requires_grad_() for name, g in inputs["gates"].items()}
    state = inputs["initial_state"]
    states = [s.detach().to(dtype).requires_grad_() for s in (state if isinstance(state, tuple) else (state,))]
    o, final = fn(**leaves, **gates, initial_state=tuple(states) if isinstance(state, tuple) else states[0],
                  output_final_state=True, **kwargs)
    finals = final if isinstance(final, tuple) else (final,)
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum()
    for s in finals:
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)).sum()
    loss.backward()
    result = {"o": o.detach(), **{f"final_{i}": s.detach() for i, s in enumerate(finals)}}
    result.update({f"d{name}": x.grad for name, x in {**leaves, **gates}.items()})
    result.update({f"dinitial_{i}": s.grad for i, s in enumerate(states)})
    return result


def assert_close_to_reference(rule: Rule, inputs: dict, tol: float = 1e-4, **chunk_kwargs) -> None:
    ref = run_with_grads(rule.naive, inputs, torch.float64)
    out = run_with_grads(rule.chunk, inputs, torch.float32, **chunk_kwargs)
    assert ref.keys() == out.keys()
    errors = {name: rel_rms(out[name], ref[name]) for name in ref}
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"{rule.name}: relative RMS error above {tol}: {bad}"


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 17, 64, 65, 200])
@pytest.mark.parametrize("name", RULES)
def test_chunk_matches_naive(name: str, T: int, chunk_size: int) -> None:
    rule = get_rule(name)
    assert_close_to_reference(rule, make_inputs(rule, T=T, seed=T), chunk_size=chunk_size)


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("name", MOMENTUM_RULES)
def test_momentum_gate_regimes(name: str, regime: str) -> None:
    rule = get_rule(name)
    assert_close_to_reference(rule, make_inputs(rule, T=130, regime=regime), chunk_size=64)


@pytest.mark.parametrize("chunk_size", [8, 32, 128])
def test_other_chunk_sizes_and_odd_dims(chunk_size: int) -> None:
    rule = get_rule("momentum_delta")
    assert_close_to_reference(rule, make_inputs(rule, B=1, T=150, H=3, K=5, V=7), chunk_size=chunk_size)


def test_scale_and_no_initial_state() -> None:
    rule = get_rule("gated_delta")
    inputs = make_inputs(rule)
    kwargs = dict(q=inputs["q"], k=inputs["k"], v=inputs["v"], scale=0.3, **inputs["gates"])
    o_ref, s_ref = rule.naive(**kwargs, output_final_state=True)
    o, s = rule.chunk(**kwargs, output_final_state=True, chunk_size=16)
    assert rel_rms(o, o_ref) < 1e-10 and rel_rms(s, s_ref) < 1e-10
    assert rule.chunk(**kwargs)[1] is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(dtype: torch.dtype) -> None:
    rule = get_rule("momentum_delta")
    inputs = make_inputs(rule)
    q, k, v = (inputs[n].to(dtype) for n in ("q", "k", "v"))
    o, (S, M) = rule.chunk(q, k, v, **inputs["gates"], output_final_state=True, chunk_size=16)
    assert o.dtype == dtype and S.dtype == M.dtype == torch.float32
    o_naive, (S_naive, _) = rule.naive(q, k, v, **inputs["gates"], output_final_state=True)
    assert o_naive.dtype == dtype and S_naive.dtype == torch.float32
    assert rel_rms(S, S_naive) < 1e-5


def identity_case(seed: int = 3) -> dict:
    inputs = make_inputs(get_rule("momentum_delta"), T=40, seed=seed)
    inputs["initial_state"] = inputs["initial_state"][0]
    return inputs


def run_naive(name: str, inputs: dict, gates: dict, initial_state) -> tuple:
    return get_rule(name).naive(inputs["q"], inputs["k"], inputs["v"], **gates, initial_state=initial_state,
                                output_final_state=True)


@pytest.mark.parametrize("momentum_rule, first_order_rule", [("momentum_delta", "gated_delta"),
                                                             ("decay_momentum", "decay")])
def test_identity_momentum_rule_without_momentum(momentum_rule: str, first_order_rule: str) -> None:
    """mu -> 0 (log_mu = -30), eta = 1 turns each momentum rule into its first-order counterpart."""
    x = identity_case()
    g = x["gates"]
    S0 = x["initial_state"]
    no_momentum = dict(g, log_mu=torch.full_like(g["beta"], -30.0), eta=torch.ones_like(g["beta"]))
    o1, (S1, _) = run_naive(momentum_rule, x, no_momentum, (S0, torch.zeros_like(S0)))
    o2, S2 = run_naive(first_order_rule, x, {"log_alpha": g["log_alpha"], "beta": g["beta"]}, S0)
    assert rel_rms(o1, o2) < 1e-6 and rel_rms(S1, S2) < 1e-6


def test_identity_gated_delta_without_decay_is_delta() -> None:
    x = identity_case()
    g = x["gates"]
    o1, S1 = run_naive("gated_delta", x, {"log_alpha": torch.zeros_like(g["beta"]), "beta": g["beta"]},
                       x["initial_state"])
    o2, S2 = run_naive("delta", x, {"beta": g["beta"]}, x["initial_state"])
    assert rel_rms(o1, o2) < 1e-6 and rel_rms(S1, S2) < 1e-6


def test_identity_decay_with_unit_gates_is_linear() -> None:
    x = identity_case()
    ones = torch.ones_like(x["gates"]["beta"])
    o1, S1 = run_naive("decay", x, {"log_alpha": torch.zeros_like(ones), "beta": ones}, x["initial_state"])
    o2, S2 = run_naive("linear", x, {}, x["initial_state"])
    assert rel_rms(o1, o2) < 1e-6 and rel_rms(S1, S2) < 1e-6


@pytest.mark.parametrize("name", RULES)
def test_gradcheck_chunk(name: str) -> None:
    rule = get_rule(name)
    x = make_inputs(rule, B=1, T=11, H=1, K=3, V=2, seed=7)
    states = x["initial_state"] if rule.momentum else (x["initial_state"],)
    tensors = [x["q"], x["k"], x["v"], *x["gates"].values(), *states]
    tensors = [t.clone().requires_grad_() for t in tensors]
    gate_names = list(x["gates"])

    def f(q, k, v, *rest):
        gates = dict(zip(gate_names, rest[:len(gate_names)]))
        init = rest[len(gate_names):]
        o, final = rule.chunk(q, k, v, **gates, initial_state=tuple(init) if rule.momentum else init[0],
                              output_final_state=True, chunk_size=8)
        return (o, *final) if rule.momentum else (o, final)

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-6)


def test_registering_a_seventh_rule() -> None:
    """A new rule is one step function plus one registration; chunk and naive come for free."""

    def step(state, k, v, beta, log_mu, eta):  # momentum SGD on the regression loss, no weight decay
        S, M = state
        residual = torch.einsum("bhkv,bhk->bhv", S, k) - v
        M = log_mu.exp()[..., None, None] * M + eta[..., None, None] * k[..., :, None] * residual[..., None, :]
        return S - beta[..., None, None] * M, M

    toy = Rule(name="toy_momentum_sgd", gates=("beta", "log_mu", "eta"), delta=True, step=step,
               recurrence="M_t = m_t M_{t-1} + e_t k_t (S_{t-1}^T k_t - v_t)^T; S_t = S_{t-1} - b_t M_t")
    register_rule(toy)
    try:
        assert get_rule("toy_momentum_sgd") is toy and "toy_momentum_sgd" in list_rules()
        assert_close_to_reference(toy, make_inputs(toy, T=70), chunk_size=16)
        with pytest.raises(ValueError, match="already registered"):
            register_rule(toy)
    finally:
        unregister_rule("toy_momentum_sgd")
    assert "toy_momentum_sgd" not in list_rules()


# ---- bad input -------------------------------------------------------------------------------------------

def call(name: str = "momentum_delta", **overrides):
    rule = get_rule(name)
    x = make_inputs(rule)
    kwargs = dict(q=x["q"], k=x["k"], v=x["v"], **x["gates"], initial_state=x["initial_state"])
    kwargs.update(overrides)
    kwargs = {key: value for key, value in kwargs.items() if value is not None or key == "initial_state"}
    chunk_size = kwargs.pop("chunk_size", 16)
    return rule.chunk(**kwargs, chunk_size=chunk_size)


def test_unknown_rule_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown rule 'momentum'.*momentum_delta"):
        get_rule("momentum")


@pytest.mark.parametrize("overrides, message", [
    ({"log_mu": None}, "log_mu: missing gate for rule 'momentum_delta'"),
    ({"alpha": torch.zeros(2, 17, 2)}, "alpha: unexpected gate for rule 'momentum_delta'"),
    ({"k": torch.zeros(2, 17, 2, 9)}, r"k: expected shape \[2, 17, 2, 8\]"),
    ({"v": torch.zeros(2, 16, 2, 12)}, r"v: expected shape \[B, T, H, V\]"),
    ({"beta": torch.zeros(2, 17, 3)}, r"beta: expected shape \[2, 17, 2\]"),
    ({"q": torch.zeros(2, 17, 2, 8, dtype=torch.int64)}, "q: expected a floating dtype"),
    ({"eta": torch.zeros(2, 17, 2, dtype=torch.int32)}, "eta: expected a floating dtype"),
    ({"k": torch.zeros(2, 17, 2, 8, dtype=torch.float64, device="meta")}, "k: expected a tensor on cpu"),
    ({"chunk_size": 48}, "chunk_size: expected a power of two"),
    ({"chunk_size": 256}, "chunk_size: expected a power of two"),
    ({"initial_state": torch.zeros(2, 2, 8, 12)}, r"initial_state: rule 'momentum_delta' expects a tuple \(S, M\)"),
    ({"initial_state": (torch.zeros(2, 2, 8, 12), torch.zeros(2, 2, 12, 8))},
     r"initial_state\[1\]: expected shape \[2, 2, 8, 12\]"),
])
def test_bad_input_names_the_argument(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(**overrides)


def test_bad_initial_state_for_single_state_rule() -> None:
    S = torch.zeros(2, 2, 8, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="initial_state: rule 'gated_delta' expects one tensor S"):
        call("gated_delta", initial_state=(S, S))


def test_mismatched_qkv_dtypes() -> None:
    rule = get_rule("linear")
    x = make_inputs(rule)
    with pytest.raises(ValueError, match="q, k, v: expected one dtype"):
        rule.naive(x["q"], x["k"].float(), x["v"])


def test_cli_lists_the_six_rules() -> None:
    result = CliRunner().invoke(app, ["rules"])
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == RULES
    assert "gates: log_alpha, beta, log_mu, eta" in lines[4] and "M_t = m_t M_{t-1}" in lines[4]


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("name", ["delta", "gated_delta", "momentum_delta"])
def test_chunk_matches_naive_with_beta_near_two(name: str, chunk_size: int) -> None:
    """allow_neg_eigval: beta in (0, 2), so the transition's eigenvalue along k, 1 - beta, is near -1."""
    rule = get_rule(name)
    inputs = make_inputs(rule, T=130, seed=7)
    g = torch.Generator().manual_seed(8)
    inputs["gates"]["beta"] = 1.8 + 0.199 * torch.rand(inputs["gates"]["beta"].shape, generator=g, dtype=torch.float64)
    assert_close_to_reference(rule, inputs, chunk_size=chunk_size)
