#!/usr/bin/env bash
# The no-distillation baseline: the same student, initialisation and data, MLM loss only (no teacher).
#   PIPE=OUT OUT=runs/baseline recipes/baseline.sh [train.py arguments]
: "${BATCH_SIZE:=5}"  # this script's per-GPU batch in the paper
source "$(dirname "$0")/common.sh"
run_train --alpha_mlm 0.5 "$@"
