#!/usr/bin/env bash
# The main job: the whole paper pipeline on real Russian text, on this machine's CPU (see README).
#   ./demo.sh [--quick] [--out runs/demo] [--cache_dir runs/cache] [--threads N] [--precision fp32|bf16]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
ensure_venv
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python scripts/demo.py "$@"
