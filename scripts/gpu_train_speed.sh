#!/usr/bin/env bash
# Default `sandbox run` speed on one GPU, before and after, in one call:
#   bash scripts/gpu_train_speed.sh OUT SPEC...     with SPEC = tree:mode:rule[:cold]
# tree: a checkout (e.g. .wt/fast-base at 3395388, .wt/fast); mode: base (plain `sandbox run`), eager
# (--no-compile), graph (the default: CUDA graph), inductor (--inductor: torch.compile + CUDA graph);
# cold: fresh Triton and inductor caches (else one warm cache per tree and mode).
# Each run: tokens/s and final metric from results.json, wall from the shell (process start to exit).
set -uo pipefail
OUT=$1; shift
mkdir -p "$OUT/runs"
for spec in "$@"; do
  IFS=: read -r tree mode rule cold <<<"$spec"
  name="$(basename "$tree")-$mode-$rule${cold:+-cold}"
  cache="$OUT/cache/$(basename "$tree")-$mode"
  [ -n "$cold" ] && cache="$OUT/cache/$name"
  mkdir -p "$cache"
  args=(run --rule "$rule" --out "$OUT/runs/$name")
  [ "$mode" = eager ] && args+=(--no-compile)
  [ "$mode" = inductor ] && args+=(--inductor)
  start=$(date +%s.%N)
  ( cd "$tree" && export PYTHONPATH=$PWD TRITON_CACHE_DIR=$cache/triton TORCHINDUCTOR_CACHE_DIR=$cache/inductor &&
    timeout 240 python3 -m sandbox "${args[@]}" ) > "$OUT/runs/$name.log" 2>&1
  rc=$?
  wall=$(python3 -c "print($(date +%s.%N) - $start)")
  python3 - "$OUT/runs/$name" "$name" "$wall" "$rc" <<'PY' | tee -a "$OUT/runs.jsonl"
import json, sys
from pathlib import Path
folder, name, wall, rc = sys.argv[1:]
try:
    r = json.loads((Path(folder) / "results.json").read_text())
except Exception:
    r = {}
print(json.dumps({"run": name, "rc": int(rc), "shell_wall_s": round(float(wall), 1),
                  "tokens_per_second": round(r.get("tokens_per_second", 0)), "final_metric": r.get("final_metric"),
                  "test_metric": r.get("test_metric"), "compiled": r.get("compiled"), "cuda_graph": r.get("cuda_graph")}))
PY
  grep -h "^note:" "$OUT/runs/$name.log" || true
  [ "$rc" = 0 ] || tail -5 "$OUT/runs/$name.log"
done
