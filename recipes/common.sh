# Sourced by the recipes: the paper's shared settings (PAPER_NOTES.md s.5) over ./train_multi_gpu.sh.
#
# Environment: PIPE (a run_pipeline.py --out_dir, built with --student_config recipes/student_config.json for
# the paper's student), TEACHER (the teacher directory), OUT (the dump directory), optional TEACHER_CACHE (a
# cache_teacher.py cache for the recipe's alignment: the KL term then reads it instead of running the teacher),
# optional BATCH_SIZE (per process; the paper's 4, or 5 where the recipe says so), optional N_GPU_NODE / N_NODES /
# ... (see train_multi_gpu.sh). SMOKE=1: a few steps on CPU with a tiny batch,
# for the tests. Extra arguments of a recipe go to train.py (after the recipe's own, so they override them).
set -euo pipefail
: "${PIPE:?set PIPE to a run_pipeline.py --out_dir}"
: "${OUT:?set OUT to the output (dump) directory}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The paper's optimisation: per-GPU batch 4, gradient accumulation 128, up to 64 epochs, AdamW (lr 5e-4, betas
# 0.9/0.98, eps 1e-6, no weight decay), warm-up over 5% of the updates, ReduceLROnPlateau factor 0.5 (patience 3,
# cooldown 3, threshold 1e-2, min lr 1e-6: the trainer's schedule), clipping at 5, validation on 10%, seed 42.
# --resume auto: relaunching a recipe after a crash continues from the newest complete checkpoint in OUT.
paper_args=(--pipeline_dir "$PIPE" --dump_path "$OUT" --batch_size "${BATCH_SIZE:-4}" --gradient_accumulation_steps 128
            --n_epoch 64 --learning_rate 5e-4 --adam_epsilon 1e-6 --weight_decay 0 --warmup_prop 0.05
            --reduce_factor 0.5 --max_grad_norm 5 --valid_prop 0.1 --group_by_size --seed 42
            --log_interval 10 --checkpoint_interval 500 --resume auto)
teacher_args() {  # the teacher, and its cache when TEACHER_CACHE is set
  : "${TEACHER:?set TEACHER to the teacher directory}"
  printf '%s\n' --teacher_name "$TEACHER"
  if [[ -n "${TEACHER_CACHE:-}" ]]; then printf '%s\n' --teacher_cache "$TEACHER_CACHE"; fi
}
smoke_args=()
if [[ "${SMOKE:-0}" == 1 ]]; then
  export N_GPU_NODE="${N_GPU_NODE:-1}"
  smoke_args=(--device cpu --max_steps 2 --batch_size 4 --gradient_accumulation_steps 1 --n_epoch 1 --valid_prop 0.02
              --checkpoint_interval 2 --log_interval 1)
fi
run_train() {  # run_train [train.py arguments] [-- sub-command arguments]
  local main=() sub=()
  while (($#)); do
    if [[ "$1" == -- ]]; then shift; sub=("$@"); break; fi
    main+=("$1"); shift
  done
  exec "$root/train_multi_gpu.sh" "${paper_args[@]}" "${main[@]}" "${smoke_args[@]}" "${sub[@]}"
}
