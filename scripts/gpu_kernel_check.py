"""Check the Triton chunk kernels on a CUDA GPU: the GPU test suite, then a timing table.

    PYTHONPATH=. python scripts/gpu_kernel_check.py --out results/      # tests + timings
    PYTHONPATH=. python scripts/gpu_kernel_check.py --skip-tests        # timings only

Writes ``kernel_errors.md`` (relative RMS error of every output and gradient, per case, from
``tests/test_kernels_gpu.py``) and ``kernel_timings.md`` (median ms of forward and forward+backward,
``triton.testing.do_bench``) into ``--out``, and prints both.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import triton.testing

from sandbox.rules import get_rule

RULES = ["linear", "decay", "delta", "gated_delta", "momentum_delta", "decay_momentum"]
SHAPES = [(8, 4096, 16, 128), (32, 512, 4, 64)]      # (B, T, H, D), the shapes of docs/notes/kernels.md


def run_tests(out: Path, jobs: int, select: str | None) -> int:
    """Run the GPU tests in ``jobs`` parallel pytest processes (kernel compilation is CPU-bound);
    turn their KERNEL-ERRORS lines into a markdown table."""
    pytest = [sys.executable, "-m", "pytest", "tests/test_kernels_gpu.py", "-p", "no:cacheprovider"]
    if select:
        pytest += ["-k", select]
    collected = subprocess.run(pytest + ["--collect-only", "-q"], capture_output=True, text=True).stdout
    node_ids = [line for line in collected.splitlines() if "::" in line]
    groups = [node_ids[i::jobs] for i in range(jobs) if node_ids[i::jobs]]
    # Each process logs to its own file as it goes, so a run stopped by a time limit keeps what it did.
    logs = out / "pytest-logs"
    logs.mkdir(exist_ok=True)
    processes = [subprocess.Popen([*pytest[:3], "-s", "-q", "-p", "no:cacheprovider", *group],
                                  stdout=open(logs / f"{i}.log", "w"), stderr=subprocess.STDOUT)
                 for i, group in enumerate(groups)]
    returncode = max((process.wait() for process in processes), default=1)
    outputs = [(logs / f"{i}.log").read_text() for i in range(len(groups))]
    log = "\n".join(outputs)
    (out / "kernel_tests.log").write_text(log)
    for i in range(len(groups)):
        (logs / f"{i}.log").unlink()
    logs.rmdir()
    summaries = [output.strip().splitlines()[-1] for output in outputs if output.strip()]
    rows = []
    for line in log.splitlines():
        if line.startswith("KERNEL-ERRORS "):
            _, rule, T, D, dtype, C, regime, *errors = line.split()
            worst = lambda names: max((float(e.split("=")[1]) for e in errors if e.split("=")[0] in names),
                                      default=0.0)
            gates = [e.split("=")[0] for e in errors if e.split("=")[0] not in
                     ("o", "S", "M", "dq", "dk", "dv", "dS0", "dM0")]
            rows.append(f"| {rule} | {T[2:]} | {D[2:]} | {dtype} | {C[2:]} | {regime} | "
                        f"{worst(('o', 'S', 'M')):.1e} | {worst(('dq', 'dk', 'dv', 'dS0', 'dM0')):.1e} | "
                        f"{worst(gates):.1e} |")
    table = ["| rule | T | D | dtype | C | regime | o, states | dq dk dv dS0 dM0 | gate grads |",
             "|---|---|---|---|---|---|---|---|---|", *rows,
             "", f"{len(node_ids)} tests in {len(groups)} processes: " + "; ".join(summaries)]
    (out / "kernel_errors.md").write_text("\n".join(table) + "\n")
    print("\n".join(table), flush=True)
    return returncode


def training_step(name: str, B: int, T: int, H: int, D: int):
    """A closure running forward+backward of one rule (bf16 inputs, float32 gates, no states), and its leaves."""
    rule = get_rule(name)
    device = "cuda"
    q = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=device), dim=-1).bfloat16().requires_grad_()
    v = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    ranges = {"log_alpha": -0.5 * torch.rand(B, T, H, device=device), "beta": torch.rand(B, T, H, device=device),
              "log_mu": -torch.rand(B, T, H, device=device), "eta": 2 * torch.rand(B, T, H, device=device)}
    gates = {g: ranges[g].requires_grad_() for g in rule.gates}
    do = torch.randn_like(v)
    leaves = [q, k, v, *gates.values()]

    def forward():
        return rule.triton(q, k, v, chunk_size=64, **gates)[0]

    def forward_backward():
        forward().backward(do)

    return forward, forward_backward, leaves


def time_rule(name: str, B: int, T: int, H: int, D: int) -> tuple[float, float]:
    """Median ms of the forward and of forward+backward."""
    forward, forward_backward, leaves = training_step(name, B, T, H, D)
    with torch.no_grad():
        fwd = triton.testing.do_bench(forward)
    fwd_bwd = triton.testing.do_bench(forward_backward, grad_to_none=leaves)
    return fwd, fwd_bwd


def profile_rules(out: Path, shapes: list) -> None:
    """Per-kernel CPU and CUDA time of one forward+backward per rule and shape (torch.profiler), and the
    do_bench medians beside them (far above the kernels' sum: the host is the bottleneck)."""
    lines = []
    for name in RULES:
        for shape in shapes:
            _, forward_backward, leaves = training_step(name, *shape)
            forward_backward()                      # compile and warm up outside the profile
            for leaf in leaves:                     # so the profiled step assigns .grad instead of adding
                leaf.grad = None
            torch.cuda.synchronize()
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as prof:
                forward_backward()
                torch.cuda.synchronize()
            lines += [f"## {name} {shape}", prof.key_averages().table(sort_by="device_time_total", row_limit=14)]
            fwd, fwd_bwd = time_rule(name, *shape)
            lines.append(f"do_bench median: forward {fwd:.3f} ms, forward+backward {fwd_bwd:.3f} ms")
    (out / "kernel_profile.txt").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


def run_timings(out: Path) -> None:
    header = " | ".join(f"B{B} T{T} H{H} D{D}" for B, T, H, D in SHAPES)
    table = [f"| rule (bf16, ms: forward / forward+backward) | {header} |", "|---" * (len(SHAPES) + 1) + "|"]
    for name in RULES:
        cells = []
        for shape in SHAPES:
            fwd, fwd_bwd = time_rule(name, *shape)
            cells.append(f"{fwd:.3f} / {fwd_bwd:.3f}")
        table.append(f"| {name} | " + " | ".join(cells) + " |")
        print(table[-1], flush=True)
    table.append(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    (out / "kernel_timings.md").write_text("\n".join(table) + "\n")
    print("\n".join(table), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the result files")
    parser.add_argument("--skip-tests", action="store_true", help="only the timing table")
    parser.add_argument("--skip-timings", action="store_true", help="only the tests")
    parser.add_argument("--profile", action="store_true", help="also a per-kernel profile of each rule")
    parser.add_argument("--jobs", type=int, default=6, help="parallel pytest processes")
    parser.add_argument("--select", help="pytest -k expression to run a subset of the GPU tests")
    parser.add_argument("--profile-shape", type=int, choices=range(len(SHAPES)),
                        help="profile only SHAPES[i] (0: large, 1: small)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_kernel_check: needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0 if args.skip_tests else run_tests(args.out, args.jobs, args.select)
    if not args.skip_timings:
        run_timings(args.out)
    if args.profile:
        profile_rules(args.out, SHAPES if args.profile_shape is None else [SHAPES[args.profile_shape]])
    sys.exit(status)


if __name__ == "__main__":
    main()
