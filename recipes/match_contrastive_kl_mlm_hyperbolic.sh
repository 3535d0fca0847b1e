#!/usr/bin/env bash
# The paper's match_contrastive_kl_mlm_hyperbolic: match KL (T 2, alpha 2.0) + MLM 0.5 + contrastive 0.1 in the
# Poincare ball: curvature from the teacher's MLM logits (1000 vectors, PCA to 1000 components, 3 tries), teacher
# states projected to the student's width by HypLinear layers, 32 negatives. The paper ran it on one GPU.
#   PIPE=OUT TEACHER=T OUT=runs/hyperbolic recipes/match_contrastive_kl_mlm_hyperbolic.sh [train.py arguments]
source "$(dirname "$0")/common.sh"
mapfile -t teacher < <(teacher_args)
curvature=(--n_samples_to_precompute_c 1000 --n_components 1000 --n_tries 3)
if [[ "${SMOKE:-0}" == 1 ]]; then curvature=(--n_samples_to_precompute_c 60 --n_components 8 --n_tries 2); fi
run_train "${teacher[@]}" --alpha_ce 2.0 --alpha_mlm 0.5 --temperature 2 --align_logits match \
  --alpha_contrastive 0.1 --align_hiddens match --projection_strategy average_by_layers --project_to student \
  --n_negative_samples 32 --negative_sampling_strategy student "$@" \
  -- hyperbolic --init_c precompute_from_teacher --delta_vectors logits "${curvature[@]}" --use_hyperbolic_projections
