"""Registers and spills of the chunk kernels for an H100 (sm_90), compiled on any machine, no GPU needed.

    PYTHONPATH=. python scripts/kernel_registers.py                       # every kernel and rule
    PYTHONPATH=. python scripts/kernel_registers.py --kernel backward_chunk --rule momentum_delta --set BV=32

Compiles each kernel ahead of time with the launch options ``sandbox.kernels._launch_config`` gives bf16
inputs at K = V = 128 (``--set`` overrides them) and prints what ``cuobjdump --dump-resource-usage`` reads
from the binary: registers per thread and the stack, which is where spilled registers go (Triton kernels have
no other local arrays). A kernel at 255 registers with a stack of kilobytes spills; the GPU sweep
(``scripts/kernel_sweep.py``) says whether that costs time. Uses the ptxas and cuobjdump that ship with the
Triton wheel; the figures are those of the installed Triton, so match its version to the GPU machine's.
"""

import argparse
import inspect
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import sandbox.kernels as kernels
from sandbox.kernels import chunk

RULES = {"linear": dict(DECAY=False, BETA=False, DELTA=False, MOMENTUM=False),
         "decay": dict(DECAY=True, BETA=False, DELTA=False, MOMENTUM=False),
         "delta": dict(DECAY=False, BETA=True, DELTA=True, MOMENTUM=False),
         "gated_delta": dict(DECAY=True, BETA=True, DELTA=True, MOMENTUM=False),
         "momentum_delta": dict(DECAY=True, BETA=True, DELTA=True, MOMENTUM=True),
         "decay_momentum": dict(DECAY=True, BETA=False, DELTA=False, MOMENTUM=True)}
KERNELS = ("prepare", "forward_scan", "forward_output", "backward_intra", "backward_scan", "backward_matrices",
           "backward_chunk")
# Pointers to bf16 tensors (the inputs, their gradients, U and the per-chunk states); the others are float32.
HALF_POINTERS = {"q_ptr", "k_ptr", "v_ptr", "do_ptr", "o_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "u_ptr",
                 "s_chunks_ptr", "m_chunks_ptr", "ds_chunks_ptr", "dm_chunks_ptr"}


class Bf16Cuda:
    """Stands in for q in ``_launch_config``: bf16 on CUDA."""
    is_cuda = True
    dtype = torch.bfloat16


def resource_usage(kernel, constants: dict, num_warps: int, num_stages: int) -> dict:
    params = list(inspect.signature(kernel.fn).parameters)
    signature = {}
    for name in params:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in HALF_POINTERS else "*fp32"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(params.index(name),): value for name, value in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    return {key.lower(): int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", action="append", choices=KERNELS, help="only these (repeatable)")
    parser.add_argument("--rule", action="append", choices=list(RULES), help="only these (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=INT",
                        help="override a launch option, e.g. BV=32 or num_warps=8 (repeatable)")
    args = parser.parse_args()
    overrides = {name: int(value) for name, value in (item.split("=", 1) for item in args.set)}
    for kernel_name in args.kernel or KERNELS:
        kernel = getattr(chunk, f"{kernel_name}_kernel")
        params = inspect.signature(kernel.fn).parameters
        for rule in args.rule or RULES:
            switches = RULES[rule]
            if kernel_name == "prepare" and not switches["DELTA"]:
                continue
            config = kernels._launch_config(Bf16Cuda, 128, 128, switches)
            options = {**config[kernel_name], **overrides}
            num_warps = options.pop("num_warps", 4)
            num_stages = options.pop("num_stages", 1)
            constants = {"C": 64, "PREC": config["PREC"], "HAS_INITIAL": False, "HAS_DFINAL": False,
                         "STORE_DV": True, **switches, **options}
            constants = {name: value for name, value in constants.items() if name in params}
            usage = resource_usage(kernel, constants, num_warps, num_stages)
            shown = " ".join(f"{name}={value}" for name, value in options.items())
            print(f"{kernel_name:17s} {rule:15s} warps={num_warps} stages={num_stages} {shown:22s} "
                  f"registers={usage['reg']} stack={usage['stack']} B", flush=True)


if __name__ == "__main__":
    main()
