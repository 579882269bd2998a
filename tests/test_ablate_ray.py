"""`sandbox ablate --backend ray` on the CPU with a Ray started by the command: the same folder layout,
failure handling and resume as the local backend (ray is in the dev extra, so CI runs this)."""

from __future__ import annotations

import csv
import sys

import pytest
from test_ablate import TINY_BASE, invoke, write

from sandbox.ray_backend import gpu_share

ray = pytest.importorskip("ray")


def test_ray_backend_runs_fails_and_resumes_like_the_local_one(tmp_path):
    recipe = write(tmp_path / "tiny.toml", TINY_BASE + '[grid]\nrule = ["delta", "no_such_rule"]\n')
    out = tmp_path / "ablation"

    first = invoke("ablate", recipe, "--out", out, "--backend", "ray")
    assert first.exit_code == 1, first.output   # the bad grid point fails alone; the summary is written
    assert "error: 1 of 2 run(s) failed" in first.output
    with open(out / "summary.csv") as f:
        rows = {row["rule"]: row for row in csv.DictReader(f)}
    assert rows["delta"]["status"] == "ok" and float(rows["delta"]["final_metric"]) >= 0
    assert (out / rows["delta"]["folder"] / "results.json").is_file()
    assert rows["no_such_rule"]["status"] == "failed"
    assert (out / rows["no_such_rule"]["log"]).read_text().rstrip().endswith("exit code: 2")
    assert not ray.is_initialized()   # the Ray this command started is stopped

    again = invoke("ablate", recipe, "--out", out, "--backend", "ray")
    assert "1 finished, 1 to run" in again.output
    assert (out / rows["no_such_rule"]["log"]).read_text().count("exit code: 2") == 2   # retried


@pytest.mark.parametrize("args, message", [
    (["--backend", "spark"], "--backend: expected one of local, ray"),
    (["--address", "auto"], "--address: only with --backend ray"),
    (["--gpus-per-run", "0.5"], "--gpus-per-run: only with --backend ray"),
    (["--backend", "ray", "--jobs", "2"], "--jobs: with --backend ray"),
])
def test_ray_options_are_checked_before_anything_runs(tmp_path, args, message):
    recipe = write(tmp_path / "tiny.toml", TINY_BASE + '[grid]\nrule = ["delta"]\n')
    result = invoke("ablate", recipe, "--out", tmp_path / "out", *args)
    assert result.exit_code == 2 and result.output.startswith(f"error: {message}"), result.output
    assert not (tmp_path / "out").exists()


def test_without_ray_installed_the_backend_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` now fails as if it were not installed
    recipe = write(tmp_path / "tiny.toml", TINY_BASE + '[grid]\nrule = ["delta"]\n')
    result = invoke("ablate", recipe, "--out", tmp_path / "out", "--backend", "ray")
    assert result.exit_code == 2 and 'ray is not installed here (pip install -e ".[ray]")' in result.output


def test_gpu_share_defaults_to_a_whole_gpu_when_there_are_gpus():
    assert gpu_share(None, 2.0) == 1.0 and gpu_share(None, 0) == 0.0 and gpu_share(0.25, 1.0) == 0.25
    with pytest.raises(ValueError, match="--gpus-per-run"):
        gpu_share(1.0, 0)
