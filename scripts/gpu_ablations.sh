#!/usr/bin/env bash
# Run ablation recipes side by side on one GPU and pack what the reproductions need into one archive.
#   bash scripts/gpu_ablations.sh OUTDIR SECONDS RECIPE:JOBS [RECIPE:JOBS ...]
# Each recipe runs as `sandbox ablate RECIPE --jobs JOBS --out OUTDIR/<name>`, all at once; after SECONDS the
# ablations are stopped (finished runs are kept, and re-running the same command resumes the rest).
# OUTDIR/ablations.tar.gz holds every summary and each run's config.toml, results.json and metrics.jsonl
# (no checkpoints), so `sandbox report` can rebuild the summaries elsewhere.
set -uo pipefail
out=$1; seconds=$2; shift 2
mkdir -p "$out"
{
  date -u +"start %Y-%m-%dT%H:%M:%SZ"
  echo "commit $(cat COMMIT 2>/dev/null || git rev-parse HEAD)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
pids=()
for item in "$@"; do
  recipe=${item%%:*}; jobs=${item##*:}; name=$(basename "$recipe" .toml)
  start=$(date +%s)
  ( timeout "$seconds" python3 -m sandbox ablate "$recipe" --jobs "$jobs" --out "$out/$name" > "$out/$name.log" 2>&1
    echo "$name: exit $? after $(( $(date +%s) - start )) s" >> "$out/machine.txt" ) &
  pids+=($!)
done
wait "${pids[@]}"
date -u +"end %Y-%m-%dT%H:%M:%SZ" >> "$out/machine.txt"
for item in "$@"; do
  name=$(basename "${item%%:*}" .toml)
  python3 -m sandbox report "$out/$name" > /dev/null 2>&1 || true
done
cd "$out" && tar czf ablations.tar.gz --exclude='*.pt' --exclude='events.out*' --exclude='configs' \
  machine.txt ./*.log $(for item in "$@"; do basename "${item%%:*}" .toml; done)
