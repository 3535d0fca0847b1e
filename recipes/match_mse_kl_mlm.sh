#!/usr/bin/env bash
# The paper's match_mse_kl_mlm: match KL (T 2, alpha 2.0) + MLM 0.5 + MSE 0.1 between the averages of all hidden
# states at matched positions, the student's projected to the teacher's width (trainable: see README, Departures).
#   PIPE=OUT TEACHER=T OUT=runs/match_mse recipes/match_mse_kl_mlm.sh [train.py arguments]
source "$(dirname "$0")/common.sh"
mapfile -t teacher < <(teacher_args)
run_train "${teacher[@]}" --alpha_ce 2.0 --alpha_mlm 0.5 --temperature 2 --align_logits match \
  --alpha_mse 0.1 --align_hiddens match --projection_strategy average_by_layers --project_to teacher "$@"
