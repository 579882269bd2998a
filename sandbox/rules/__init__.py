"""The registry of update rules: ``get_rule(name)``, ``list_rules()``, ``register_rule(rule)``.

Adding a rule: write ``sandbox/rules/<name>.py`` with a ``step`` function and a ``RULE = Rule(...)``,
then add it to ``_BUILTIN`` below.
"""

from __future__ import annotations

from . import decay, decay_momentum, delta, gated_delta, linear, momentum_delta
from .rule import ALL_GATES, Rule, State

_BUILTIN = (linear.RULE, decay.RULE, delta.RULE, gated_delta.RULE, momentum_delta.RULE, decay_momentum.RULE)
_REGISTRY: dict[str, Rule] = {rule.name: rule for rule in _BUILTIN}


def register_rule(rule: Rule) -> Rule:
    """Add a rule to the registry (its gates must be a subset of ALL_GATES, in that order)."""
    if not isinstance(rule, Rule):
        raise ValueError(f"rule: expected a sandbox.rules.Rule, got {type(rule).__name__}")
    if rule.gates != tuple(g for g in ALL_GATES if g in rule.gates):
        raise ValueError(f"rule.gates: expected a subset of {ALL_GATES} in that order, got {rule.gates}")
    if rule.name in _REGISTRY:
        raise ValueError(f"rule.name: '{rule.name}' is already registered")
    _REGISTRY[rule.name] = rule
    return rule


def unregister_rule(name: str) -> None:
    """Remove a rule registered with ``register_rule`` (the built-in six stay)."""
    if name in {r.name for r in _BUILTIN}:
        raise ValueError(f"name: '{name}' is a built-in rule and cannot be removed")
    _REGISTRY.pop(name, None)


def get_rule(name: str) -> Rule:
    if name not in _REGISTRY:
        raise ValueError(f"rule: unknown rule '{name}', expected one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def list_rules() -> list[str]:
    return list(_REGISTRY)


__all__ = ["ALL_GATES", "Rule", "State", "get_rule", "list_rules", "register_rule", "unregister_rule"]
