"""Host time of one rule call at a small shape: how much goes to Triton's launcher, how much to the rest.

    PYTHONPATH=. python scripts/host_overhead.py [--shape 32,512,4,64]

At small shapes the GPU finishes each kernel before the host has launched the next, so a call costs its host
time. This times, per rule, many calls back to back (forward, and forward+backward) with one synchronisation
at the end, and splits the host time between the Triton kernel launches (each launcher wrapped in a timer)
and everything else (autograd, buffer allocation, Python).
"""

import argparse
import time
from collections import defaultdict

import torch

import sandbox.kernels as kernels
from gpu_kernel_check import RULES, training_step

LAUNCH_TIME = defaultdict(float)


class TimedKernel:
    """Stands in for a Triton kernel in ``sandbox.kernels``: ``kernel[grid](...)`` timed on the host."""

    def __init__(self, name: str, kernel):
        self.name, self.kernel = name, kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def timed(*args, **kwargs):
            start = time.perf_counter()
            launch(*args, **kwargs)
            LAUNCH_TIME[self.name] += time.perf_counter() - start
        return timed


def host_ms(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    LAUNCH_TIME.clear()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,512,4,64")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    for name in dir(kernels):
        if name.endswith("_kernel"):
            setattr(kernels, name, TimedKernel(name, getattr(kernels, name)))
    for rule in RULES:
        forward, forward_backward, leaves = training_step(rule, *shape)

        def step():
            forward_backward()
            for leaf in leaves:
                leaf.grad = None

        with torch.no_grad():
            fwd = host_ms(forward, args.calls)
        fwd_launch = sum(LAUNCH_TIME.values()) * 1e3 / args.calls
        both = host_ms(step, args.calls)
        launches = {k: v * 1e3 / args.calls for k, v in LAUNCH_TIME.items()}
        print(f"{rule:15s} forward {fwd:.3f} ms (launchers {fwd_launch:.3f}); forward+backward {both:.3f} ms "
              f"(launchers {sum(launches.values()):.3f}: "
              + ", ".join(f"{k.removesuffix('_kernel')} {v * 1e3:.0f}us" for k, v in launches.items()) + ")",
              flush=True)


if __name__ == "__main__":
    main()
