#!/usr/bin/env bash
# Build a compact Ray for a GPU machine that has no network and no Ray: the files it needs for
# `sandbox ablate --backend ray` (ray.init on one node, tasks with num_gpus), as one .tar.xz to carry there.
#   bash scripts/build_ray_bundle.sh RAY_WHEEL DEPS_DIR OUT.tar.xz [--strip]
# RAY_WHEEL: the ray wheel for the target's Python (e.g. ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl);
# DEPS_DIR: wheels of the dependencies the target lacks, fetched for its Python, e.g. for Python 3.12:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d DEPS_DIR \
#       jsonschema referencing rpds-py jsonschema-specifications
# The wheels are unpacked into one tree (unpack it anywhere and put it on PYTHONPATH), less what a local
# ray.init() with GPU tasks never imports: Java (ray/jars), the libraries rllib, data, serve, llm, tune,
# train, and the dashboard's web client (ray/dashboard/client: sandbox starts Ray with include_dashboard=False;
# the dashboard's Python modules stay, the node's agent runs from them). --strip also removes the symbol
# tables of the three native binaries (_raylet.so, raylet, gcs_server: about 35 MB of 120 MB); the dynamic
# symbols stay, only crash backtraces lose their function names.
set -euo pipefail
wheel=$1; deps=$2; out=$3; strip_symbols=${4:-}
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
# Unpack keeping the files' modes (the raylet and GCS server are started as programs; plain unzipping in
# Python drops the executable bits).
python3 - "$tree" "$wheel" "$deps"/*.whl <<'EOF_PY'
import os, sys, zipfile
tree, *wheels = sys.argv[1:]
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            path = archive.extract(info, tree)
            mode = info.external_attr >> 16
            if mode and not info.is_dir():
                os.chmod(path, mode & 0o777)
EOF_PY
rm -rf "$tree"/ray/jars "$tree"/ray/rllib "$tree"/ray/data "$tree"/ray/serve "$tree"/ray/llm "$tree"/ray/tune \
       "$tree"/ray/train "$tree"/ray/dashboard/client
if [[ $strip_symbols == --strip ]]; then
  strip --strip-unneeded "$tree"/ray/_raylet.so "$tree"/ray/core/src/ray/raylet/raylet \
                         "$tree"/ray/core/src/ray/gcs/gcs_server
fi
mkdir -p "$(dirname "$out")"
# One thread, niced: the build machine may be shared.
tar -C "$tree" -cf - . | nice -n 19 xz -9 -T1 > "$out.partial"
mv "$out.partial" "$out"
echo "$out: $(du -b "$out" | cut -f1) bytes; unpacked $(du -sb "$tree" | cut -f1) bytes"
