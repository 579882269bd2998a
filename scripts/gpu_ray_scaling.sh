#!/usr/bin/env bash
# Time one ablation with `sandbox ablate --backend ray` on every GPU of this machine against the local backend
# on one GPU (issue 13 item 7), on a machine without Ray and without network: Ray comes from a bundle
# (scripts/build_ray_bundle.sh) unpacked to $SITE and put on PYTHONPATH.
#   bash scripts/gpu_ray_scaling.sh OUT [RECIPE] [BUNDLE]
# RECIPE defaults to recipes/quick.toml (42 runs), BUNDLE to the one
# .tar.xz under .whl-ray/. Legs, in this order (LEGS="local1 ray2" by default; "local2" adds the local backend
# on every GPU):
#   local1  CUDA_VISIBLE_DEVICES=0 python3 -m sandbox ablate RECIPE --out OUT/local1   (default --jobs: up to 12 runs/GPU)
#   ray2    python3 -m sandbox ablate RECIPE --backend ray --gpus-per-run $GPUS_PER_RUN --out OUT/ray2
#   local2  python3 -m sandbox ablate RECIPE --out OUT/local2                          (runs spread over the GPUs)
# GPUS_PER_RUN (default 0.0833: the local backend's 12 runs per GPU; empty: Ray's default, a whole GPU per run).
# Each leg gets its own empty Triton cache (both start cold, as on a fresh machine) and LEG_TIMEOUT seconds
# (default 240); a leg that fails or times out is reported and the others still run. While a leg runs, every
# second: each GPU's utilisation and memory (OUT/LEG.gpus.csv) and each `sandbox run` process with its
# CUDA_VISIBLE_DEVICES (OUT/LEG.procs.txt; results.json only names the device's model, not which GPU).
# OUT/scaling.txt: machine, nvidia-smi before and after, each leg's command, exit code and wall time, and per
# leg the runs finished, the GPUs they ran on, runs at a time, mean tokens/s and GPU utilisation.
# Checkpoints (*.pt) are deleted at the end so that OUT stays small. Environment variables already set
# (NCCL_NVLS_ENABLE=0 and the like) are passed on untouched.
set -uo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: bash scripts/gpu_ray_scaling.sh OUT [RECIPE] [BUNDLE]" >&2
  exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "cannot create $1" >&2; exit 2; }
recipe=${2:-recipes/quick.toml}
bundle=${3:-$(ls .whl-ray/*.tar.xz 2>/dev/null | head -n 1)}
site=${SITE:-/tmp/site}
legs=${LEGS:-local1 ray2}
leg_timeout=${LEG_TIMEOUT:-240}
gpus_per_run=${GPUS_PER_RUN-0.0833}
report=$out/scaling.txt
say() { echo "$*" | tee -a "$report"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
seconds() { printf '%d.%d' $(( $1 / 1000 )) $(( $1 % 1000 / 100 )); }   # milliseconds as seconds, 1 decimal
processes() {   # PATTERN (extended regex): the pids whose command line matches (no pgrep needed)
  local cmdline
  for cmdline in /proc/[0-9]*/cmdline; do
    tr '\0' ' ' < "$cmdline" 2>/dev/null | grep -qE -- "$1" && { cmdline=${cmdline#/proc/}; echo "${cmdline%/cmdline}"; }
  done
}

: > "$report"
say "start $(date -u +%Y-%m-%dT%H:%M:%SZ); commit $(cat COMMIT 2>/dev/null || git rev-parse HEAD 2>/dev/null)"
say "recipe $recipe; legs: $legs; leg timeout ${leg_timeout} s; gpus per ray run: ${gpus_per_run:-ray default}"
say "environment: CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset} $(env | grep -E '^(NCCL|RAY)_' | sort | tr '\n' ' ')"
say "cpu cores $(nproc); $(python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "gpus", torch.cuda.device_count())' 2>&1)"
{ echo "--- nvidia-smi before"; nvidia-smi 2>&1
  nvidia-smi --query-gpu=index,name,pci.bus_id,memory.total,driver_version --format=csv 2>&1; } >> "$report"

# Ray from the bundle: unpacked once per machine (kept between calls while the machine stays warm).
if [[ -n $bundle && -f $bundle ]]; then
  if [[ ! -f $site/.unpacked || $(cat "$site/.unpacked") != "$(stat -c '%s %Y' "$bundle")" ]]; then
    begin=$(now_ms)
    rm -rf "$site" && mkdir -p "$site" && tar -C "$site" -xJf "$bundle" && stat -c '%s %Y' "$bundle" > "$site/.unpacked"
    say "unpacked $bundle ($(du -b "$bundle" | cut -f1) bytes) to $site: exit $?, $(seconds $(( $(now_ms) - begin ))) s"
  fi
else
  say "no Ray bundle found (${bundle:-none}); the ray leg uses whatever ray is importable"
fi
export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export RAY_USAGE_STATS_ENABLED=0   # no network here: no usage report
say "ray: $(python3 -c 'import ray; print(ray.__version__, ray.__file__)' 2>&1 | tail -n 1)"

sample() {   # LEG: once a second, GPU use and the `sandbox run` processes with their CUDA_VISIBLE_DEVICES
  local leg=$1 t pid environment devices run
  while :; do
    t=$(date +%s)
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader,nounits 2>/dev/null \
      | sed "s/^/$t, /" >> "$out/$leg.gpus.csv"
    for pid in $(processes ' -m sandbox run '); do
      environment=$(tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null) || continue   # it has just ended
      devices=$(sed -n 's/^CUDA_VISIBLE_DEVICES=//p' <<< "$environment")
      run=$(tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | grep -A1 -x -e --out -e --resume | tail -n 1)
      # Only this leg's runs (their folders are absolute paths under it), not some other `sandbox run`.
      [[ $run == "$out/$leg/"* ]] && echo "$t $pid ${devices:-unset} $(basename "$run")"
    done >> "$out/$leg.procs.txt"
    sleep 1
  done
}

stop_ray() {   # after a Ray leg that did not end cleanly: no raylet or GCS server may outlive it
  if [[ -n $(processes 'ray/core/src/ray/(raylet/raylet|gcs/gcs_server)') ]]; then
    say "  Ray processes left over: ray stop --force"
    timeout 60 python3 -m ray.scripts.scripts stop --force >> "$out/ray-stop.log" 2>&1
  fi
}

run_leg() {   # NAME: one `sandbox ablate` of the recipe, timed
  local name=$1 begin end code sampler
  local -a command=(python3 -m sandbox ablate "$recipe" --out "$out/$name")
  local -a environment=(TRITON_CACHE_DIR=/tmp/triton-cache-$name)
  case $name in
    local1) environment+=(CUDA_VISIBLE_DEVICES=0) ;;
    ray*) command+=(--backend ray); [[ -n $gpus_per_run ]] && command+=(--gpus-per-run "$gpus_per_run") ;;
  esac
  rm -rf "/tmp/triton-cache-$name" "$out/$name" "$out/$name".*
  say ""
  say "== $name: ${environment[*]} ${command[*]}"
  sample "$name" & sampler=$!
  begin=$(now_ms)
  env "${environment[@]}" timeout -k 30 "$leg_timeout" "${command[@]}" > "$out/$name.log" 2>&1
  code=$?
  end=$(now_ms)
  kill "$sampler" 2> /dev/null; wait "$sampler" 2> /dev/null
  say "$name: exit $code$([[ $code == 124 || $code == 137 ]] && echo " (timed out after $leg_timeout s)"), wall $(seconds $(( end - begin ))) s"
  grep -E '^(recipe|--jobs|error)' "$out/$name.log" | sed 's/^/  /' | tee -a "$report"
  [[ $name == ray* ]] && stop_ray
  if [[ $name == ray* && $code != 0 && -d /tmp/ray/session_latest/logs ]]; then
    tar -C /tmp/ray/session_latest -czf "$out/$name.ray-logs.tgz" logs 2>/dev/null
  fi
  echo "$name $code $(seconds $(( end - begin )))" >> "$out/walls.txt"
}

: > "$out/walls.txt"
for name in $legs; do run_leg "$name"; done

{ echo ""; echo "--- nvidia-smi after"; nvidia-smi 2>&1; } >> "$report"

python3 - "$out" $legs <<'EOF' 2>&1 | tee -a "$report"
import collections, glob, json, os, statistics, sys

out, legs = sys.argv[1], sys.argv[2:]
walls = {name: (int(code), float(wall)) for name, code, wall in (line.split() for line in open(f"{out}/walls.txt"))}
print("\n--- per leg")
for leg in legs:
    results = [json.load(open(path)) for path in sorted(glob.glob(f"{out}/{leg}/runs/*/results.json"))]
    plan = f"{out}/{leg}/plan.json"
    planned = len(json.load(open(plan))["runs"]) if os.path.exists(plan) else "?"
    code, wall = walls.get(leg, ("?", float("nan")))
    print(f"{leg}: exit {code}, wall {wall:.1f} s, {len(results)} of {planned} runs finished "
          f"({60 * len(results) / wall if wall > 0 else float('nan'):.1f} runs a minute, start-up included)")
    if results:
        devices = collections.Counter(f"{r['device']} ({r['provenance']['device']})" for r in results)
        speeds = [r["tokens_per_second"] for r in results]
        run_walls = [r["wall_seconds"] for r in results]
        print(f"  results.json device: {dict(devices)}")
        print(f"  tokens/s per run: mean {statistics.mean(speeds):,.0f}, min {min(speeds):,.0f}, max {max(speeds):,.0f}; "
              f"run wall (trainer's own) mean {statistics.mean(run_walls):.1f} s, sum {sum(run_walls):.0f} s")
    # Which GPU each run was given: the CUDA_VISIBLE_DEVICES of its `sandbox run` process, sampled each second.
    seen, at_once = collections.defaultdict(set), collections.defaultdict(set)
    path = f"{out}/{leg}.procs.txt"
    for line in open(path) if os.path.exists(path) else []:
        t, pid, devices, run = line.split(maxsplit=3)
        seen[devices].add(run.strip())
        at_once[t].add((devices, run.strip()))
    for devices, runs in sorted(seen.items()):
        print(f"  CUDA_VISIBLE_DEVICES={devices}: {len(runs)} runs")
    if at_once:
        per_gpu = [collections.Counter(d for d, _ in runs) for runs in at_once.values()]
        most = {d: max(c.get(d, 0) for c in per_gpu) for d in sorted(seen)}
        print(f"  runs at a time (1 s samples): max {max(len(r) for r in at_once.values())}, "
              f"mean {statistics.mean(len(r) for r in at_once.values()):.1f}; max per CUDA_VISIBLE_DEVICES {most}")
    usage = collections.defaultdict(list)
    path = f"{out}/{leg}.gpus.csv"
    for line in open(path) if os.path.exists(path) else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[2].replace(".", "").isdigit():
            usage[parts[1]].append((float(parts[2]), float(parts[3])))
    for gpu, samples in sorted(usage.items()):
        busy = [u for u, _ in samples]
        print(f"  GPU {gpu}: utilisation mean {statistics.mean(busy):.0f}%, >0 in {sum(u > 0 for u in busy)}/{len(busy)} "
              f"samples; memory max {max(m for _, m in samples):.0f} MiB")
done = {leg: wall for leg, (code, wall) in walls.items() if code == 0}
if "local1" in done and "ray2" in done:
    print(f"\nray2 vs local1: {done['local1'] / done['ray2']:.2f}x faster (wall {done['local1']:.1f} s -> {done['ray2']:.1f} s)")
EOF

find "$out" -name '*.pt' -delete
say "end $(date -u +%Y-%m-%dT%H:%M:%SZ)"
