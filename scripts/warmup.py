"""Fill Triton's caches before a timed bench: one process per (impl, rule, shape), in parallel.

    TRITON_CACHE_DIR=/tmp/triton-cache PYTHONPATH=.:/tmp/site python scripts/warmup.py \
        --shape 8,4096,16,128 --shape 32,512,4,64 --triton linear --triton momentum_delta --fla linear

Compiling is CPU work, one kernel at a time per process; the bench would otherwise pay it case after case.
Each process runs one forward+backward of its case (``sandbox.bench``'s inputs), so the compiled kernels land
in Triton's cache folder, where the bench process finds them. fla also autotunes every kernel for every head
size, compiling each config in turn (one and a half to three minutes per function and shape): the timing
part of each autotune step holds a file lock, so one process at a time times configs on the GPU and the
configs chosen are those an idle GPU would choose. fla keeps its choices in the cache folder too
(``*.autotune.json``; fla's ``FLA_CACHE_RESULTS``, on by default); ``scripts/gpu_bench.sh`` carries those
files between machines.
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


def warm_one(impl: str, rule_name: str, shape_text: str) -> None:
    from sandbox.bench import import_fla, make_forward, parse_shape, random_inputs
    from sandbox.rules import get_rule

    fla = import_fla() if impl == "fla" else None
    if fla is not None:
        import fla.ops.common.chunk_o as fla_chunk_o

        fla_chunk_o.TRITON_ABOVE_3_7_1 = True      # as `sandbox bench --fla-lift-hopper-guard`: timing only
        time_configs_one_at_a_time()
    rule, shape = get_rule(rule_name), parse_shape(shape_text)
    inputs = random_inputs(rule, shape, torch.bfloat16, torch.device("cuda"), seed=0)
    for x in [inputs["q"], inputs["k"], inputs["v"], *inputs["gates"].values()]:
        x.requires_grad_(True)
    forward = make_forward(rule, impl, 64, fla)
    with torch.no_grad():
        forward(inputs["q"], inputs["k"], inputs["v"], **inputs["gates"])
    forward(inputs["q"], inputs["k"], inputs["v"], **inputs["gates"]).backward(torch.randn_like(inputs["v"]))
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", required=True, help="B,T,H,D; repeatable")
    parser.add_argument("--triton", action="append", default=[], metavar="RULE", help="our kernels; repeatable")
    parser.add_argument("--fla", action="append", default=[], metavar="RULE", help="fla's counterpart; repeatable")
    parser.add_argument("--one", nargs=3, metavar=("IMPL", "RULE", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        warm_one(*args.one)
        return
    start = time.time()
    cases = [(impl, rule, shape) for impl in ("triton", "fla") for rule in getattr(args, impl)
             for shape in args.shape]
    processes = {case: subprocess.Popen([sys.executable, __file__, "--shape", case[2], "--one", *case],
                                        env=os.environ) for case in cases}
    failed = [case for case, process in processes.items() if process.wait() != 0]
    print(f"warm-up: {len(cases)} cases in {time.time() - start:.0f} s; failed: {failed or 'none'}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
