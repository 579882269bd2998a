"""The mixer layer and the model: step mode equals sequence mode, gate ranges, sizes, causality."""

import pytest
import torch

from sandbox.layer import CONV_SIZE, RuleMixer, ShortConv
from sandbox.model import LanguageModel
from sandbox.rules import get_rule, list_rules

RULES = list_rules()


def make_mixer(rule: str, **kwargs) -> RuleMixer:
    torch.manual_seed(0)
    return RuleMixer(get_rule(rule), d_model=32, heads=2, chunk_size=8, **kwargs).double()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("short_conv", [True, False])
def test_prefill_then_step_equals_full_sequence(rule, short_conv):
    """Chunk-mode prefill (returning rule and conv state), then token-by-token steps = one forward."""
    mixer = make_mixer(rule, short_conv=short_conv)
    x = torch.randn(2, 21, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    full, _ = mixer(x)
    prefix, state = mixer(x[:, :13], output_state=True)   # 13: one whole chunk of 8 and a partial one
    outputs = [prefix]
    for t in range(13, 21):
        y, state = mixer.step(x[:, t], state)
        outputs.append(y[:, None])
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", ["gated_delta", "momentum_delta"])
def test_stepping_from_scratch_equals_sequence_in_float32(rule):
    torch.manual_seed(0)
    mixer = RuleMixer(get_rule(rule), d_model=32, heads=2, chunk_size=16)
    x = torch.randn(3, 40, 32)
    full, _ = mixer(x)
    state, outputs = None, []
    for t in range(40):
        y, state = mixer.step(x[:, t], state)
        outputs.append(y)
    torch.testing.assert_close(torch.stack(outputs, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T, with_previous", [(1, False), (2, True), (17, False), (17, True)])
def test_short_conv_shifted_products_equal_the_grouped_conv(T, with_previous):
    """The CPU path (shifted products) and the CUDA path (grouped conv1d) of ShortConv: the same outputs,
    states and gradients."""
    torch.manual_seed(0)
    conv = ShortConv(6).double()
    x = torch.randn(2, T, 6, dtype=torch.float64, requires_grad=True)
    previous = torch.randn(2, 6, CONV_SIZE - 1, dtype=torch.float64) if with_previous else None
    results = []
    for path in (conv.shifted_products, conv.grouped_conv):
        y, state = path(x, previous)
        grads = torch.autograd.grad((y * torch.cos(y)).sum(), [x, conv.weight, conv.bias])
        results.append((y, state, *grads))
    for a, b in zip(*results):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_model_step_equals_forward():
    torch.manual_seed(0)
    model = LanguageModel(50, "momentum_delta", d_model=32, layers=2, heads=2, chunk_size=8).double()
    tokens = torch.randint(0, 50, (2, 19))
    full, _ = model(tokens)
    prefix, states = model(tokens[:, :7], output_states=True)
    outputs = [prefix]
    for t in range(7, 19):
        logits, states = model.step(tokens[:, t], states)
        outputs.append(logits[:, None])
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", RULES)
def test_naive_and_chunk_impls_agree_in_the_layer(rule):
    chunk = make_mixer(rule)
    naive = make_mixer(rule, impl="naive")
    naive.load_state_dict(chunk.state_dict())
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    torch.testing.assert_close(naive(x)[0], chunk(x)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", RULES)
def test_layer_computes_exactly_the_rules_gates(rule):
    mixer = make_mixer(rule)
    gates = mixer.gates(torch.randn(2, 5, 32, dtype=torch.float64))
    assert tuple(gates) == get_rule(rule).gates
    assert set(mixer.gate_projs) == set(get_rule(rule).gates)
    for g in gates.values():
        assert g.shape == (2, 5, 2)


def test_gate_ranges_and_stability_constraint():
    """alpha in (0, 1], beta in [0, 1], eta in [0, 2], log mu >= min_log_mu; with the constraint alpha + beta <= 1."""
    x = 30 * torch.randn(4, 64, 32, dtype=torch.float64)   # large inputs push every gate to its limits
    for constrained in (True, False):
        mixer = make_mixer("momentum_delta", stability_constraint=constrained, min_log_mu=-1.5)
        gates = mixer.gates(x)
        alpha, beta = gates["log_alpha"].exp(), gates["beta"]
        assert (alpha > 0).all() and (alpha <= 1).all()
        assert (beta >= 0).all() and (beta <= 1).all()
        assert (gates["eta"] >= 0).all() and (gates["eta"] <= 2).all()
        assert (gates["log_mu"] >= -1.5).all() and (gates["log_mu"] == -1.5).any()
        if constrained:
            assert (alpha + beta <= 1 + 1e-12).all()
        else:
            assert (alpha + beta > 1).any()
            torch.testing.assert_close(beta, torch.sigmoid(torch.nn.functional.linear(x, mixer.gate_projs["beta"].weight)))


def test_stability_constraint_only_for_momentum_rules():
    assert not hasattr(make_mixer("gated_delta"), "log_factor")
    assert hasattr(make_mixer("momentum_delta"), "log_factor")
    assert not hasattr(make_mixer("momentum_delta", stability_constraint=False), "log_factor")


def test_state_size_and_parameter_count():
    plain = LanguageModel(64, "gated_delta", d_model=32, layers=3, heads=2)
    momentum = LanguageModel(64, "momentum_delta", d_model=32, layers=3, heads=2)
    attention = LanguageModel(64, "attention", d_model=32, layers=3, heads=2)
    assert plain.state_size(64)[0] == 3 * 2 * 16 * 16
    assert momentum.state_size(64)[0] == 2 * 3 * 2 * 16 * 16
    floats, label = attention.state_size(100)
    assert floats == 2 * 3 * 32 * 100 and "grows with T" in label
    assert plain.parameter_count() == sum(p.numel() for p in plain.parameters())
    # Tied head: the only [vocab, d_model] matrix is the embedding.
    assert [n for n, p in plain.named_parameters() if p.shape == (64, 32)] == ["embedding.weight"]


@pytest.mark.parametrize("rule", ["attention", "momentum_delta"])
def test_model_is_causal(rule):
    torch.manual_seed(0)
    model = LanguageModel(50, rule, d_model=32, layers=2, heads=2, chunk_size=8)
    tokens = torch.randint(0, 50, (1, 24))
    changed = tokens.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 50
    torch.testing.assert_close(model(tokens)[0][:, :15], model(changed)[0][:, :15])
    assert not torch.allclose(model(tokens)[0][:, 15:], model(changed)[0][:, 15:])


def test_recorded_stats_are_means_of_gates_and_state_norms():
    model = LanguageModel(50, "momentum_delta", d_model=32, layers=2, heads=2, chunk_size=8)
    tokens = torch.randint(0, 50, (2, 16))
    model(tokens)
    assert model.mixer_stats() == [{}, {}]   # recording is off by default: nothing is gathered
    model.set_record_stats(True)
    model(tokens)
    for stats in model.mixer_stats():
        assert set(stats) == {"alpha", "beta", "mu", "eta", "state_norm", "momentum_norm"}
        assert 0 < stats["alpha"] <= 1 and 0 < stats["beta"] < 1 and 0 < stats["eta"] < 2
        assert stats["state_norm"] > 0


def test_bad_sizes_raise_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match="d_model"):
        LanguageModel(50, "gated_delta", d_model=30, layers=1, heads=4)
    with pytest.raises(ValueError, match="rule"):
        LanguageModel(50, "nope", d_model=32, layers=1, heads=2)
    with pytest.raises(ValueError, match="impl"):
        RuleMixer(get_rule("delta"), 32, 2, impl="auto")
