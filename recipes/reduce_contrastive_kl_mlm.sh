#!/usr/bin/env bash
# The paper's reduce_contrastive_kl_mlm: match KL (T 2, alpha 2.0) + MLM 0.5 + contrastive 0.1 on the averages of
# all hidden states at reduce positions (the student's t2s pass, pieces pooled onto teacher tokens), 64 student
# negatives.
#   PIPE=OUT TEACHER=T OUT=runs/reduce_contrastive recipes/reduce_contrastive_kl_mlm.sh [train.py arguments]
source "$(dirname "$0")/common.sh"
mapfile -t teacher < <(teacher_args)
run_train "${teacher[@]}" --alpha_ce 2.0 --alpha_mlm 0.5 --temperature 2 --align_logits match \
  --alpha_contrastive 0.1 --align_hiddens reduce --projection_strategy average_by_layers --project_to teacher \
  --n_negative_samples 64 --negative_sampling_strategy student "$@"
