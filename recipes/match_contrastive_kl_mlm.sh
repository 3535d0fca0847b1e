#!/usr/bin/env bash
# The paper's match_contrastive_kl_mlm: match KL (T 2, alpha 2.0) + MLM 0.5 + contrastive 0.1 at sentence level
# (pool_and_project: every layer mean-pooled over the real positions, a learnt combination of layers), 64 student
# negatives, projections to the teacher's width; per-GPU batch 5.
#   PIPE=OUT TEACHER=T OUT=runs/match_contrastive recipes/match_contrastive_kl_mlm.sh [train.py arguments]
: "${BATCH_SIZE:=5}"  # this script's per-GPU batch in the paper
source "$(dirname "$0")/common.sh"
mapfile -t teacher < <(teacher_args)
run_train "${teacher[@]}" --alpha_ce 2.0 --alpha_mlm 0.5 --temperature 2 --align_logits match \
  --alpha_contrastive 0.1 --align_hiddens match --projection_strategy pool_and_project --project_to teacher \
  --n_negative_samples 64 --negative_sampling_strategy student "$@"
