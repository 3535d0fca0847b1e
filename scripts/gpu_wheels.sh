#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs (the GPU_PACKAGES pins of scripts/gpu_check.py), for a GPU
# machine without network access; then carry DIR there and run scripts/gpu_check.sh --wheelhouse DIR.
#
#   scripts/gpu_wheels.sh [DIR (default .wheelhouse)] [PYTHON_VERSION of the GPU machine (default 3.12)]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.wheelhouse}
version=${2:-3.12}
PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mapfile -t pins < <("$PYTHON" scripts/gpu_check.py --pins)
platforms=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$version" --implementation cp "${platforms[@]}" -d "$dir" "${pins[@]}"
echo "wheels for Python $version in $dir:" >&2
ls "$dir" >&2
