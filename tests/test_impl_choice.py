"""`--impl` is recorded truthfully: the attention baseline has one implementation, so naming another is an error."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sandbox.cli import app


@pytest.mark.parametrize("impl", ["naive", "chunk", "triton"])
def test_attention_with_an_update_rule_implementation_is_one_line_error(tmp_path, impl):
    result = CliRunner().invoke(app, ["run", "--rule", "attention", "--impl", impl, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: impl: '{impl}' is an implementation of the update rules")
    assert result.output.count("\n") == 1 and not (tmp_path / "run").exists()
