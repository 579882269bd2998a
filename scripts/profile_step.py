"""Profile steady-state training steps of the default run with torch.profiler: where a step's time goes.

    PYTHONPATH=. python scripts/profile_step.py --rule momentum_delta --device cuda --out profile.json

Runs the default config's Trainer for ``--warmup`` steps, then profiles ``--steps`` more and prints, per step:
the wall time, the device busy time by kernel category and the host time by call category. Works on the
trainer of main at 3395388 (batches made inside ``_train_step``) and on the later one (``train_batches``).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sandbox.config import resolve_config
from sandbox.train import Trainer

# Device kernels by name, first match wins.
KERNEL_CATEGORIES = [
    ("rule kernels (Triton)", r"prepare_kernel|forward_scan|forward_output|backward_intra|backward_scan|backward_chunk"),
    ("attention (SDPA)", r"flash|fmha|attention|sdpa"),
    ("matrix products", r"gemm|cutlass|sm90_xmma|nvjet|cublas|splitK"),
    ("fused elementwise (inductor)", r"^triton_"),
    ("optimizer and clipping", r"multi_tensor|fused_adam|Adam|foreach|norm_kernel"),
    ("copies and casts", r"copy|Memcpy|memcpy|cast|fill|Memset"),
    ("reductions", r"reduce|softmax|cross_entropy|nll|sum|mean|cumsum|scan"),
    ("other elementwise", r"elementwise|vectorized|unrolled|index|gather|scatter|cat|where"),
]
# Host calls by name (CPU events), first match wins.
HOST_CATEGORIES = [
    ("waits for the device", r"cudaStreamSynchronize|cudaDeviceSynchronize|cudaEventSynchronize|cudaMemcpy(?!Async)|item|_local_scalar_dense|is_nonzero"),
    ("kernel launches", r"cudaLaunchKernel|cuLaunchKernel|cudaGraphLaunch|cudaLaunch"),
    ("batch generation", r"randint|multinomial|topk|rand|scatter|batch"),
]
# On the CPU there are no kernels: the ops' self time by kind, first match wins.
CPU_OP_CATEGORIES = [
    ("triangular solve", r"solve_triangular"),
    ("matrix products", r"aten::(mm|bmm|addmm|addmv|baddbmm|matmul|linear|dot)$"),
    ("optimizer and clipping", r"Optimizer|_foreach|adam|clip|norm"),
    ("copies, casts and layout", r"copy|clone|contiguous|cat|stack|pad|constant_pad|fill|zero|to$|_to_copy|empty|index|slice|narrow|select|expand|view|reshape|permute|transpose|as_strided"),
    ("reductions and scans", r"sum|mean|cumsum|logsumexp|softmax|cross_entropy|nll|max|min"),
    ("elementwise", r"aten::"),
]


def categorize(name: str, categories: list[tuple[str, str]]) -> str:
    for label, pattern in categories:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return label
    return "other"


def run_steps(trainer: Trainer, count: int) -> None:
    for _ in range(count):
        if hasattr(trainer, "train_batches"):
            trainer._train_step(*trainer.train_batches.get(trainer.step))
            trainer.session_steps += 1
        else:
            trainer._train_step(record_stats=False)
        trainer.step += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rule", default="momentum_delta")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--inductor", action="store_true", help="torch.compile the forward and loss too")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from sandbox.threads import keep_freed_memory   # as `sandbox run` does, where it exists
    except ImportError:
        pass
    else:
        keep_freed_memory()

    values = {"rule": args.rule, "device": args.device, "out": tempfile.mkdtemp()}
    if args.no_compile:
        values["compile"] = False
    if args.inductor:
        values["inductor"] = True
    try:
        config = resolve_config(values)
    except ValueError:   # the trainer of 3395388 has no compile options
        values = {name: value for name, value in values.items() if name not in ("compile", "inductor")}
        config = resolve_config(values)
    trainer = Trainer(config, progress=False)
    try:
        from sandbox.runfolder import RunFolder
    except ImportError:   # trainers before the run folder class took a path
        trainer.start(Path(config.out))
    else:
        trainer.start(RunFolder.create(config.out, trainer.config))
    cuda = trainer.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run_steps(trainer, args.warmup)
    sync()
    start = time.perf_counter()
    run_steps(trainer, args.steps)
    sync()
    step_ms = (time.perf_counter() - start) / args.steps * 1e3

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run_steps(trainer, args.steps)
        sync()
    device_ms, host_ms, cpu_ops_ms, kernels = defaultdict(float), defaultdict(float), defaultdict(float), 0
    for event in prof.events():
        if cuda and event.device_type == torch.autograd.DeviceType.CUDA:
            device_ms[categorize(event.name, KERNEL_CATEGORIES)] += event.device_time / 1e3 / args.steps
            kernels += 1
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CPU and not event.key.startswith("ProfilerStep"):
            category = categorize(event.key, HOST_CATEGORIES)
            if category != "other":
                host_ms[category] += event.self_cpu_time_total / 1e3 / args.steps
            if not cuda:
                cpu_ops_ms[categorize(event.key, CPU_OP_CATEGORIES)] += event.self_cpu_time_total / 1e3 / args.steps
    # Host time by top-level op (self time), for the CPU device where there are no kernels.
    top_ops = sorted(((e.key, e.self_cpu_time_total / 1e3 / args.steps) for e in prof.key_averages()),
                     key=lambda kv: -kv[1])[:15]
    result = {"label": args.label, "rule": args.rule, "device": str(trainer.device), "impl": trainer.impl,
              "step_ms": step_ms, "tokens_per_second": config.batch_size * trainer.task.seq_len / step_ms * 1e3,
              "device_busy_ms": sum(device_ms.values()), "kernels_per_step": kernels / args.steps,
              "device_ms": dict(device_ms), "host_ms": dict(host_ms),
              "cpu_ops_ms": dict(sorted(cpu_ops_ms.items(), key=lambda kv: -kv[1])), "threads": torch.get_num_threads(),
              "top_host_ops_ms": top_ops,
              "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
