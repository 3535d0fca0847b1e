#!/usr/bin/env bash
# The CUDA path on one GPU in under 10 minutes: every alignment in bf16 and fp16 (GradScaler), online and (where
# one can serve it) from a teacher cache, under a 1-process torchrun with nccl; a kill-and-resume check; bench/real_scale.py on the GPU.
# One JSON (default bench/results/gpu_check.json); scripts/gpu_check.py lists the stages and its arguments.
#
#   scripts/gpu_check.sh [--wheelhouse DIR] [gpu_check.py arguments]
#
# Interpreter: $PYTHON, else .venv/bin/python when its torch sees a GPU, else python3 (a GPU machine's own CUDA
# torch). The pinned versions (requirements.txt) of the packages scripts/gpu_check.py names in GPU_PACKAGES that
# the interpreter lacks go into .gpu_site/ (put first on PYTHONPATH): from --wheelhouse DIR without network
# (fill DIR beforehand with scripts/gpu_wheels.sh), else from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
wheelhouse=""
args=()
while (( $# )); do
  case $1 in
    --wheelhouse) wheelhouse=${2:?--wheelhouse needs a directory}; shift 2 ;;
    --wheelhouse=*) wheelhouse=${1#*=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
      2>/dev/null; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python3
  fi
fi
site="$PWD/.gpu_site"
[[ -d $site ]] && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
mapfile -t missing < <("$PYTHON" scripts/gpu_check.py --missing_pins)
if (( ${#missing[@]} )); then
  source=()
  if [[ -n "$wheelhouse" ]]; then
    [[ -d "$wheelhouse" ]] || { echo "error: --wheelhouse $wheelhouse is not a directory; fill one with scripts/gpu_wheels.sh" >&2; exit 2; }
    source=(--no-index --find-links "$wheelhouse")
  fi
  echo "[gpu_check] installing into .gpu_site: ${missing[*]}" >&2
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile --upgrade \
      --target "$site" "${source[@]}" "${missing[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  mapfile -t still < <("$PYTHON" scripts/gpu_check.py --missing_pins)
  if (( ${#still[@]} )); then
    echo "error: still not installed at their pins: ${still[*]}" >&2
    exit 2
  fi
fi
exec "$PYTHON" scripts/gpu_check.py "${args[@]}"
