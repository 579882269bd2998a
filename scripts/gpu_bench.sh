#!/usr/bin/env bash
# The benchmark run behind BENCHMARKS.md, on a CUDA machine without network access.
#
# Expects the fla 0.6.0 wheels in .whl/ (made where pip works, from the repo root:
#   pip download --no-deps fla-core==0.6.0 einops -d .whl), installs them outside the environment,
# prints the versions, and runs `sandbox bench` with any extra flags given, writing into $OUT (default:
# ./bench-out). fla refuses its gated kernels on Hopper with Triton < 3.7.1; the guard is lifted for timing.
set -euo pipefail

OUT=${OUT:-bench-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=".:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    python3 -c "import fla; print('fla', fla.__version__)" || echo "fla not importable"
} 2>&1 | tee "$OUT/versions.txt"

python3 -m sandbox bench --fla-lift-hopper-guard --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
