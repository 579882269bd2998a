#!/usr/bin/env bash
# The benchmark run behind BENCHMARKS.md, on a CUDA machine without network access.
#
# Expects the fla 0.6.0 wheels in .whl/ (made where pip works, from the repo root:
#   pip download --no-deps fla-core==0.6.0 einops -d .whl), installs them outside the environment,
# prints the versions, and runs `sandbox bench` with any extra flags given, writing into $OUT (default:
# ./bench-out). fla refuses its gated kernels on Hopper with Triton < 3.7.1; the guard is lifted for timing.
#
# Compiling and fla's autotuning (minutes per function and shape) are paid up front and in parallel:
# WARM="rule ..." (our kernels) and FLA_WARM="rule ..." (fla's counterparts) first run scripts/warmup.py on
# those rules (shapes: WARM_SHAPES, default both of the bench). The configs fla chose are saved to
# $OUT/fla_autotune.tar.gz; FLA_AUTOTUNE=<that file> restores them on a fresh machine, so fla compiles only
# its chosen configs.
set -euo pipefail

OUT=${OUT:-bench-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=".:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
if [ -n "${FLA_AUTOTUNE:-}" ]; then
    tar -xzf "$FLA_AUTOTUNE" -C "$TRITON_CACHE_DIR"
fi

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    python3 -c "import fla; print('fla', fla.__version__)" || echo "fla not importable"
} 2>&1 | tee "$OUT/versions.txt"

save_autotune() {
    (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar -czf "$OUT/fla_autotune.tar.gz" -T -)
}
if [ -n "${WARM:-}${FLA_WARM:-}" ]; then
    args=()
    for s in ${WARM_SHAPES:-8,4096,16,128 32,512,4,64}; do args+=(--shape "$s"); done
    for r in ${WARM:-}; do args+=(--triton "$r"); done
    for r in ${FLA_WARM:-}; do args+=(--fla "$r"); done
    python3 scripts/warmup.py "${args[@]}" 2>&1 | tee "$OUT/warmup.log" || echo "warm-up failed: the bench compiles and autotunes itself"
    save_autotune
fi

python3 -m sandbox bench --fla-lift-hopper-guard --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
save_autotune
