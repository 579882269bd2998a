"""``sandbox bench`` on CPU: a tiny shape with the loop and the chunk form, its JSON, and its usage errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sandbox.bench import CaseResult, add_ratios, parse_shape
from sandbox.cli import app

TINY = ["--shape", "2,40,2,8", "--dtype", "float32", "--device", "cpu", "--repeats", "1"]


def invoke(*args: str):
    return CliRunner().invoke(app, ["bench", *args])


def test_bench_writes_json_with_every_case(tmp_path):
    out = tmp_path / "bench.json"
    result = invoke(*TINY, "--rule", "gated_delta", "--rule", "momentum_delta",
                    "--impl", "naive", "--impl", "chunk", "--impl", "triton", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert {"created", "environment", "timer", "options", "notes", "results"} <= report.keys()
    assert {"device", "torch", "triton", "fla"} <= report["environment"].keys()
    assert "perf_counter" in report["timer"]
    cases = {(r["rule"], r["impl"]): r for r in report["results"]}
    assert set(cases) == {(rule, impl) for rule in ("gated_delta", "momentum_delta")
                          for impl in ("naive", "chunk", "triton")}
    for rule in ("gated_delta", "momentum_delta"):
        for impl in ("naive", "chunk", "triton"):   # triton in the interpreter: conftest sets TRITON_INTERPRET=1
            case = cases[(rule, impl)]
            assert case["status"] == "ok", case
            assert case["shape"] == "2,40,2,8"
            assert case["fwd_ms"] > 0 and case["fwd_bwd_ms"] > 0
            assert case["err_vs_loop"] < 1e-5            # float32 against the float64 loop
    assert "momentum_delta" in result.output and "err vs loop" in result.output


def test_bench_skips_triton_on_the_cpu_without_the_interpreter(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    out = tmp_path / "bench.json"
    result = invoke(*TINY, "--rule", "delta", "--impl", "triton", "--out", str(out))
    assert result.exit_code == 0, result.output
    (case,) = json.loads(out.read_text())["results"]
    assert case["status"] == "skipped" and "TRITON_INTERPRET=1" in case["note"]


def test_bench_no_backward_and_long_sequences_skip_the_loop(tmp_path):
    out = tmp_path / "bench.json"
    result = invoke(*TINY, "--rule", "linear", "--impl", "naive", "--impl", "chunk", "--naive-max-t", "16",
                    "--no-backward", "--no-check", "--out", str(out))
    assert result.exit_code == 0, result.output
    naive, chunk = json.loads(out.read_text())["results"]
    assert naive["status"] == "skipped" and "T > 16" in naive["note"]
    assert chunk["status"] == "ok" and chunk["fwd_bwd_ms"] is None and chunk["err_vs_loop"] is None


def test_bench_never_overwrites_and_default_name_is_new(tmp_path, monkeypatch):
    out = tmp_path / "taken.json"
    out.write_text("earlier results")
    result = invoke(*TINY, "--out", str(out))
    assert result.exit_code == 2 and out.read_text() == "earlier results"
    monkeypatch.chdir(tmp_path)
    for _ in range(2):   # two runs within the same second must both be kept
        assert invoke(*TINY, "--rule", "linear", "--impl", "chunk", "--no-backward").exit_code == 0
    assert len(list(tmp_path.glob("bench-*.json"))) == 2


@pytest.mark.parametrize("args, named", [
    (["--shape", "2,40,2"], "--shape"),
    (["--shape", "2,0,2,8"], "--shape"),
    (["--rule", "attention_v2"], "--rule"),
    (["--impl", "cuda"], "--impl"),
    (["--dtype", "int8"], "--dtype"),
    (["--device", "tpu"], "--device"),
    (["--repeats", "0"], "--repeats"),
    (["--chunk-size", "48"], "--chunk-size"),
    (["--resume", "no-such-bench.json"], "--resume"),
])
def test_bad_flags_exit_2_with_one_line(args, named):
    result = invoke(*args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.output


def test_ratios_are_relative_to_the_fla_counterpart_in_the_same_shape():
    results = [CaseResult("1,64,1,8", "gated_delta", "fla", "ok", fwd_ms=1.0, fwd_bwd_ms=4.0, peak_mb=100.0),
               CaseResult("1,64,1,8", "decay", "fla", "ok", fwd_ms=1.0, fwd_bwd_ms=2.0, peak_mb=50.0),
               CaseResult("1,64,1,8", "gated_delta", "triton", "ok", fwd_ms=1.0, fwd_bwd_ms=6.0, peak_mb=80.0),
               CaseResult("1,64,1,8", "momentum_delta", "chunk", "ok", fwd_ms=3.0, fwd_bwd_ms=10.0),
               CaseResult("1,64,1,8", "decay_momentum", "triton", "ok", fwd_ms=3.0, fwd_bwd_ms=3.0, peak_mb=75.0),
               CaseResult("1,64,1,8", "delta", "triton", "ok", fwd_ms=3.0, fwd_bwd_ms=3.0),
               CaseResult("2,64,1,8", "momentum_delta", "chunk", "ok", fwd_ms=3.0, fwd_bwd_ms=10.0)]
    add_ratios(results)
    assert [r.vs_fla for r in results] == [1.0, 1.0, 1.5, 2.5, 1.5, None, None]
    assert [r.peak_vs_fla for r in results] == [1.0, 1.0, 0.8, None, 1.5, None, None]


def test_resume_keeps_finished_cases_and_runs_the_rest(tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    assert invoke(*TINY, "--rule", "linear", "--impl", "chunk", "--out", str(first)).exit_code == 0
    earlier = json.loads(first.read_text())["results"][0]
    result = invoke(*TINY, "--rule", "linear", "--rule", "delta", "--impl", "chunk", "--resume", str(first),
                    "--out", str(second))
    assert result.exit_code == 0, result.output
    report = json.loads(second.read_text())
    linear, delta = report["results"]
    assert linear == earlier and delta["rule"] == "delta" and delta["status"] == "ok"
    assert "resumed from" in report["notes"][0]
    # made with other options: refused with one line, nothing written
    third = tmp_path / "third.json"
    result = invoke(*TINY, "--rule", "linear", "--impl", "chunk", "--chunk-size", "32", "--resume", str(first),
                    "--out", str(third))
    assert result.exit_code == 2 and "--resume" in result.output and "chunk_size" in result.output
    assert not third.exists()


def test_parse_shape():
    assert str(parse_shape("8,4096,16,128")) == "8,4096,16,128"
    with pytest.raises(ValueError, match="--shape"):
        parse_shape("8x4096")


def test_a_failing_case_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    import sandbox.bench as bench

    make_forward = bench.make_forward

    def broken_for_delta(rule, impl, chunk_size, fla):
        if rule.name == "delta":
            def forward(**inputs):
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
            return forward
        return make_forward(rule, impl, chunk_size, fla)

    monkeypatch.setattr(bench, "make_forward", broken_for_delta)
    out = tmp_path / "bench.json"
    result = invoke(*TINY, "--rule", "delta", "--rule", "linear", "--impl", "chunk", "--out", str(out))
    assert result.exit_code == 0, result.output
    delta, linear = json.loads(out.read_text())["results"]
    assert delta["status"] == "failed" and delta["note"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert linear["status"] == "ok"
