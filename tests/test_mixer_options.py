"""The options that make mixer comparisons fair: attention's short conv, the decay inits, negative eigenvalues."""

import math

import pytest
import torch
from typer.testing import CliRunner

from sandbox.cli import app
from sandbox.config import resolve_config
from sandbox.inits import DECAY_INITS
from sandbox.layer import AttentionMixer, RuleMixer
from sandbox.model import LanguageModel
from sandbox.rules import get_rule


def test_short_conv_applies_to_attention_too():
    with_conv = LanguageModel(64, "attention", d_model=32, layers=2, heads=2)
    without = LanguageModel(64, "attention", d_model=32, layers=2, heads=2, short_conv=False)
    # One depthwise kernel-4 conv with bias over the 3 x d_model fused q, k, v channels, per layer.
    assert with_conv.parameter_count() - without.parameter_count() == 2 * (3 * 32 * 4 + 3 * 32)
    rule = LanguageModel(64, "delta", d_model=32, layers=2, heads=2)
    rule_without = LanguageModel(64, "delta", d_model=32, layers=2, heads=2, short_conv=False)
    assert rule.parameter_count() - rule_without.parameter_count() == with_conv.parameter_count() - without.parameter_count()


def test_attention_conv_is_causal_and_changes_the_output():
    torch.manual_seed(0)
    mixer = AttentionMixer(32, 2)
    x = torch.randn(1, 12, 32)
    changed = x.clone()
    changed[:, 7:] += 1.0
    torch.testing.assert_close(mixer(x)[0][:, :7], mixer(changed)[0][:, :7])
    plain = AttentionMixer(32, 2, short_conv=False)
    plain.load_state_dict({k: v for k, v in mixer.state_dict().items() if not k.startswith("conv.")})
    assert not torch.allclose(plain(x)[0], mixer(x)[0])


@pytest.mark.parametrize("name", list(DECAY_INITS))
def test_decay_inits_give_the_documented_half_lives(name):
    torch.manual_seed(0)
    mixer = RuleMixer(get_rule("decay_momentum"), d_model=128, heads=64, decay_init=name, momentum_init=name)
    init = DECAY_INITS[name]
    shortest, longest = init.half_lives()
    A, dt = mixer.A_log.exp(), torch.nn.functional.softplus(mixer.dt_bias)
    assert ((A >= init.A_low - 1e-6) & (A <= init.A_high + 1e-6)).all()
    assert ((dt >= init.dt_low * (1 - 1e-5)) & (dt <= init.dt_high * (1 + 1e-5))).all()
    half_lives = math.log(2) / (A * dt)
    assert (half_lives >= shortest * (1 - 1e-4)).all() and (half_lives <= longest * (1 + 1e-4)).all()
    Mu = mixer.Mu_log.exp()
    assert ((Mu >= init.A_low - 1e-6) & (Mu <= init.A_high + 1e-6)).all()


def test_slow_init_remembers_longer_than_mamba2():
    torch.manual_seed(0)
    x = torch.zeros(1, 1, 128)
    alpha = {name: RuleMixer(get_rule("decay"), 128, 64, decay_init=name).gates(x)["log_alpha"].exp().min().item()
             for name in ("mamba2", "slow")}
    assert alpha["slow"] > 0.99 > alpha["mamba2"]


@pytest.mark.parametrize("rule", ["delta", "gated_delta", "momentum_delta"])
def test_allow_neg_eigval_doubles_beta(rule):
    x = 30 * torch.randn(4, 64, 32, dtype=torch.float64)
    torch.manual_seed(0)
    plain = RuleMixer(get_rule(rule), 32, 2, stability_constraint=False).double()
    torch.manual_seed(0)
    doubled = RuleMixer(get_rule(rule), 32, 2, stability_constraint=False, allow_neg_eigval=True).double()
    beta, beta2 = plain.gates(x)["beta"], doubled.gates(x)["beta"]
    torch.testing.assert_close(beta2, 2 * beta)
    assert (beta2 > 1.5).any() and (beta2 <= 2).all() and (beta2 >= 0).all()


def test_allow_neg_eigval_layer_runs_the_same_in_loop_and_chunk():
    torch.manual_seed(0)
    mixer = RuleMixer(get_rule("gated_delta"), 32, 2, chunk_size=8, allow_neg_eigval=True).double()
    x = 5 * torch.randn(2, 21, 32, dtype=torch.float64)
    chunk, _ = mixer(x)
    mixer.impl = "naive"
    torch.testing.assert_close(mixer(x)[0], chunk, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("values, message", [
    ({"decay_init": "fast"}, "decay_init: expected one of mamba2, slow"),
    ({"momentum_init": 3}, "momentum_init: expected str"),
    ({"rule": "decay", "allow_neg_eigval": True}, "allow_neg_eigval: only the delta rules"),
    ({"rule": "attention", "allow_neg_eigval": True}, "allow_neg_eigval: only the delta rules"),
])
def test_bad_option_values_name_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(values)


def test_bad_option_on_the_command_line_is_one_line():
    result = CliRunner().invoke(app, ["run", "--rule", "linear", "--allow-neg-eigval", "--steps", "1"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: allow_neg_eigval: only the delta rules (delta, gated_delta, momentum_delta) have a negative "
        "eigenvalue to allow, got rule 'linear'"]
