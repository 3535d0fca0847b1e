#!/usr/bin/env bash
# Run every benchmark (each writes bench/results/<name>.json and prints its table), then collect them into
# bench/RESULTS.md. Needs the corpus of preprocessing/get_corpus.py (built here when missing).
#   bench/run_all.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
py=.venv/bin/python
quick=()
[[ "${1:-}" == "--quick" ]] && quick=(--quick)
corpus=runs/cache/corpus/ru_sentences.txt
[[ -f $corpus ]] || $py preprocessing/get_corpus.py --out runs/cache/corpus
$py bench/preprocessing.py --corpus "$corpus"
$py bench/reduce_map.py
$py bench/train_step.py "${quick[@]}"
$py bench/kl_loss.py "${quick[@]}"
$py bench/hidden_losses.py "${quick[@]}"
if [[ ${#quick[@]} -eq 0 ]]; then
    $py bench/hidden_losses.py --batch_size 16 --seq_len 256 --out bench/results/hidden_losses_b16x256.json
fi
$py bench/parity.py --corpus "$corpus" "${quick[@]}"
$py bench/teacher_cache.py "${quick[@]}"
$py bench/real_scale.py --corpus "$corpus" "${quick[@]}"
if [[ ${#quick[@]} -eq 0 ]]; then $py bench/soak.py; else $py bench/soak.py --steps 1000; fi
$py bench/collect.py
