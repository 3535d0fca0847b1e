#!/usr/bin/env bash
# The project's test command: sets up .venv from requirements.txt when needed, then ruff and pytest, offline.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
ensure_venv
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
