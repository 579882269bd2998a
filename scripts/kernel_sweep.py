"""Per-kernel CUDA time of every rule under launch-option variants (experiment helper, GPU only).

    PYTHONPATH=. python scripts/kernel_sweep.py --out results/
    PYTHONPATH=. python scripts/kernel_sweep.py --variant base --baseline /tmp/old_kernels

Each variant overrides some kernels' options on top of ``sandbox.kernels._launch_config``; the results chose
its defaults (BENCHMARKS.md, "Kernel speed work"). Compiles every variant in parallel processes first
(Triton's disk cache is shared), then times them one by one at the large shape, and the defaults at the small.
``--baseline DIR`` also times a copy of an earlier ``sandbox/kernels`` package (e.g. from ``git archive``)
as the variant ``baseline``, in the same process, so a code change is measured against its predecessor.
"""

import argparse
import importlib.util
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch
import triton.testing

import sandbox.kernels as kernels
from gpu_kernel_check import RULES, training_step

KERNELS = ("prepare", "forward_scan", "forward_output", "backward_intra", "backward_scan", "backward_matrices",
           "backward_chunk",
           "gates_forward", "gates_backward")
SCANS = ("forward_scan", "backward_scan")
VARIANTS = {
    "base": {},
    "chunk_bv64": {"backward_chunk": {"BV": 64}},
    "chunk_s2": {"backward_chunk": {"num_stages": 2}},
    "chunk_w4": {"backward_chunk": {"num_warps": 4}},
    "chunk_bk128": {"backward_chunk": {"BK": 128, "num_warps": 8}},
    "par_bv128": {"forward_output": {"BV": 128}, "backward_intra": {"BV": 128}},
    "par_w8": {"forward_output": {"num_warps": 8}, "backward_intra": {"num_warps": 8}},
    "scan_s2": {s: {"num_stages": 2} for s in SCANS},
    "scan_bv64_w8": {s: {"BV": 64, "num_warps": 8} for s in SCANS},
    "scan_bv32_w4": {s: {"BV": 32, "num_warps": 4} for s in SCANS},
    "scan_w8": {s: {"num_warps": 8} for s in SCANS},
    "scan_bv16_w4": {s: {"BV": 16, "num_warps": 4} for s in SCANS},
    "prep_w8": {"prepare": {"num_warps": 8}},
    "chunk_bv32": {"backward_chunk": {"BV": 32}},
    "chunk_w8": {"backward_chunk": {"num_warps": 8}},
    "chunk_bv32_w8": {"backward_chunk": {"BV": 32, "num_warps": 8}},
    "chunk_bv16": {"backward_chunk": {"BV": 16}},
    "chunk_bk32": {"backward_chunk": {"BK": 32}},
    "mat_w4": {"backward_matrices": {"num_warps": 4}},
    "mat_bv32_s2": {"backward_matrices": {"BV": 32, "num_stages": 2}},
}
SHAPE = (8, 4096, 16, 128)
original = kernels._launch_config
original_forward = kernels.triton_forward
baseline_forward = None


def load_baseline(path: Path) -> None:
    """Import the package copy at ``path`` under another name; its ``triton_forward`` becomes the baseline."""
    global baseline_forward
    spec = importlib.util.spec_from_file_location("baseline_kernels", path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_kernels"] = module
    spec.loader.exec_module(module)
    baseline_forward = module.triton_forward


def use_variant(name: str) -> None:
    """Route ``rule.triton`` to the baseline copy, or to this package with the variant's options."""
    if name == "baseline":
        kernels.triton_forward = baseline_forward
        return
    kernels.triton_forward = original_forward

    def patched(q, K, V, switches):
        cfg = original(q, K, V, switches)
        for kernel, options in VARIANTS[name].items():
            cfg[kernel] = {**cfg[kernel], **options}
        return cfg
    kernels._launch_config = patched


def compile_variant(name: str) -> None:
    use_variant(name)
    for rule in RULES:
        try:
            _, step, _ = training_step(rule, 1, *SHAPE[1:])
            step()
        except Exception as error:          # a config that does not fit shows up as missing timings
            print(f"{name} {rule}: {type(error).__name__}: {str(error)[:200]}", flush=True)
    torch.cuda.synchronize()


def profile(rule: str, shape) -> dict:
    _, step, leaves = training_step(rule, *shape)
    step()
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
            for leaf in leaves:
                leaf.grad = None
        torch.cuda.synchronize()
    times = defaultdict(float)
    for event in prof.key_averages():
        name = event.key
        key = next((kernel for kernel in KERNELS if kernel in name), "other")
        times[key] += event.device_time_total / 3 / 1000
    times["total_bench"] = triton.testing.do_bench(step, grad_to_none=leaves)
    return dict(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--compile")
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), help="only these (repeatable)")
    parser.add_argument("--baseline", type=Path, help="a copy of an earlier sandbox/kernels, timed as 'baseline'")
    args = parser.parse_args()
    if args.baseline:
        load_baseline(args.baseline)
    if args.compile:
        compile_variant(args.compile)
        return
    variants = (["baseline"] if args.baseline else []) + (args.variant or list(VARIANTS))
    baseline = ["--baseline", str(args.baseline)] if args.baseline else []
    procs = [subprocess.Popen([sys.executable, __file__, "--compile", name, *baseline]) for name in variants]
    for proc in procs:
        proc.wait()
    results = {}
    for name in variants:
        use_variant(name)
        for rule in RULES:
            try:
                results[f"{name} {rule}"] = times = profile(rule, SHAPE)
            except Exception as error:
                print(f"{name} {rule}: {type(error).__name__}", flush=True)
                continue
            print(f"{name:14s} {rule:15s} " + " ".join(f"{k}={v:.3f}" for k, v in sorted(times.items())),
                  flush=True)
    use_variant("base")
    for rule in RULES:
        times = profile(rule, (32, 512, 4, 64))
        print(f"small base     {rule:15s} " + " ".join(f"{k}={v:.3f}" for k, v in sorted(times.items())),
              flush=True)
    (args.out / "sweep.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
