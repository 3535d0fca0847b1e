#!/usr/bin/env bash
# The paper's reduce_map_kl_mlm: KL (T 2, alpha 2.0) over every mapped teacher token, each scored by the logsumexp
# of its pieces' pooled student logits (--sum_probs; exact sparse implementation), + MLM 0.5.
#   PIPE=OUT TEACHER=T OUT=runs/reduce_map recipes/reduce_map_kl_mlm.sh [train.py arguments]
source "$(dirname "$0")/common.sh"
mapfile -t teacher < <(teacher_args)
run_train "${teacher[@]}" --alpha_ce 2.0 --alpha_mlm 0.5 --temperature 2 --align_logits reduce_map --sum_probs "$@"
