"""Fill Triton's caches for fla's kernels before a timed bench: one process per (rule, shape), in parallel.

    TRITON_CACHE_DIR=/tmp/triton-cache PYTHONPATH=.:/tmp/site python scripts/fla_warmup.py \
        --shape 8,4096,16,128 --shape 32,512,4,64 --rule linear --rule gated_delta

fla autotunes every kernel for every head size, compiling each config in turn: one and a half to three
minutes per function and shape, nearly all of it compile time on one CPU core. Here each (rule, shape) runs
one forward+backward of its fla counterpart (``sandbox.bench.fla_call``) in its own process, so the compiles
use all cores. The timing part of each autotune step holds a file lock: one process at a time times configs
on the GPU, so the configs chosen are those an idle GPU would choose. fla keeps the chosen configs in
Triton's cache folder (``*.autotune.json``; fla's ``FLA_CACHE_RESULTS``, on by default), where the bench
process finds them and compiles only the winners. ``scripts/gpu_bench.sh`` carries those files between
machines.
"""

import argparse
import fcntl
import os
import subprocess
import sys
import time

import torch

LOCK = "/tmp/fla_warmup.gpu.lock"


def time_configs_one_at_a_time() -> None:
    """Wrap Triton's benchmarker (the autotuner looks it up at each use): compile and run once outside the
    lock, time under it."""
    import triton.testing

    timed = triton.testing.do_bench

    def do_bench(fn, *args, **kwargs):
        fn()
        torch.cuda.synchronize()
        with open(LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return timed(fn, *args, **kwargs)

    triton.testing.do_bench = do_bench


def warm_one(rule_name: str, shape_text: str) -> None:
    import fla.ops.common.chunk_o as fla_chunk_o

    from sandbox.bench import fla_call, parse_shape, random_inputs
    from sandbox.rules import get_rule

    fla_chunk_o.TRITON_ABOVE_3_7_1 = True          # as `sandbox bench --fla-lift-hopper-guard`: timing only
    time_configs_one_at_a_time()
    rule, shape = get_rule(rule_name), parse_shape(shape_text)
    inputs = random_inputs(rule, shape, torch.bfloat16, torch.device("cuda"), seed=0)
    leaves = [inputs["q"], inputs["k"], inputs["v"], *inputs["gates"].values()]
    for x in leaves:
        x.requires_grad_(True)
    forward = fla_call(__import__("fla"), rule.name)
    with torch.no_grad():
        forward(inputs["q"], inputs["k"], inputs["v"], **inputs["gates"])
    forward(inputs["q"], inputs["k"], inputs["v"], **inputs["gates"]).backward(torch.randn_like(inputs["v"]))
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", required=True, help="B,T,H,D; repeatable")
    parser.add_argument("--rule", action="append", required=True, help="rule whose fla counterpart to warm")
    parser.add_argument("--one", nargs=2, metavar=("RULE", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        warm_one(*args.one)
        return
    start = time.time()
    jobs = {(rule, shape): subprocess.Popen([sys.executable, __file__, "--shape", shape, "--rule", rule,
                                             "--one", rule, shape], env=os.environ)
            for rule in args.rule for shape in args.shape}
    failed = [job for job, process in jobs.items() if process.wait() != 0]
    print(f"fla warm-up: {len(jobs)} (rule, shape) in {time.time() - start:.0f} s; failed: {failed or 'none'}",
          flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
