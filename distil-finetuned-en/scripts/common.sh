#!/usr/bin/env bash
# Shared settings of the GLUE recipes in scripts/<task>/ (they source this file; it is not run directly).
#
# Environment, with defaults:
#   GLUE_DIR        GLUE root holding CoLA/ SST-2/ ... as written by GLUE's download script   [glue_data]
#   TEACHER_INIT    pretrained model the teacher is fine-tuned from (HF dir, e.g. bert-base-uncased)
#                                                                               [models/bert-base-uncased]
#   TOKENIZER       tokenizer directory shared by teacher and student                   [$TEACHER_INIT]
#   STUDENT_CONFIG  student architecture: HF directory with config.json    [models/distilbert-tiny-uncased]
#   DUMPS_ROOT      outputs go to $DUMPS_ROOT/<task>/{teacher,distil_kl,distil_kl_mse,...}   [dumps/glue]
#   TEACHER         fine-tuned teacher read by distil_*.sh         [$DUMPS_ROOT/<task>/teacher/best_model]
#   STUDENT_INIT    initial student weights (preprocessing/init_weights.py, fine-tuning mode, run on
#                   the fine-tuned teacher); random initialisation when the path does not exist
#                                                                    [$DUMPS_ROOT/<task>/student_init]
#   DEVICE [auto]  PRECISION [fp32]  SEED [42]  PYTHON [python]  FORCE [0: refuse a non-empty output]
#   TOKENIZER_PARAMS [scripts/tokenizer.yaml]
#   GLOBAL_ARGS     extra flags for train.py itself, before the sub-command, e.g. "--batch_size 16"
#                   (a flag given twice takes its last value, so these override the defaults below)
# A recipe's own arguments go to its sub-command (train_single or distil_teacher), e.g. --n_epochs 2.
set -euo pipefail

SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TRAIN_PY="$SCRIPTS_DIR/../train.py"
PYTHON="${PYTHON:-python}"
GLUE_DIR="${GLUE_DIR:-glue_data}"
TEACHER_INIT="${TEACHER_INIT:-models/bert-base-uncased}"
TOKENIZER="${TOKENIZER:-$TEACHER_INIT}"
STUDENT_CONFIG="${STUDENT_CONFIG:-models/distilbert-tiny-uncased}"
DUMPS_ROOT="${DUMPS_ROOT:-dumps/glue}"
DEVICE="${DEVICE:-auto}"
PRECISION="${PRECISION:-fp32}"
SEED="${SEED:-42}"
FORCE="${FORCE:-0}"
TOKENIZER_PARAMS="${TOKENIZER_PARAMS:-$SCRIPTS_DIR/tokenizer.yaml}"
read -r -a GLOBAL_EXTRA <<< "${GLOBAL_ARGS:-}"

# Large tasks are validated every 2000 updates, small ones after every epoch.
eval_every() {
  case "$1" in
    sst2|qnli|qqp|mnli) echo 2000 ;;
    *) echo 0 ;;
  esac
}

# Public copies of QQP hold a few rows broken by stray newlines: drop them (counted in results.json).
bad_rows() {
  case "$1" in
    qqp) echo skip ;;
    *) echo error ;;
  esac
}

# common_args TASK OUT: the flags every run shares, in the array ARGS.
common_args() {
  local task="$1" out="$2"
  ARGS=(--glue_dataset "$task" --glue_dir "$GLUE_DIR" --tokenizer_name "$TOKENIZER"
        --tokenizer_params "$TOKENIZER_PARAMS" --dumps_dir "$out" --bad_rows "$(bad_rows "$task")"
        --log_after_n_steps "$(eval_every "$task")" --device "$DEVICE" --precision "$PRECISION" --seed "$SEED")
  if [[ "$FORCE" == 1 ]]; then
    ARGS+=(--force)
  fi
}

# train_teacher TASK [train_single flags]: fine-tune TEACHER_INIT on TASK (batch 32, lr 2e-5, warm-up 10%,
# lr / 1.5 after 2 validations without a new best, early stop after 5, at most 10 epochs).
train_teacher() {
  local task="$1"
  shift
  common_args "$task" "$DUMPS_ROOT/$task/teacher"
  set -x
  "$PYTHON" "$TRAIN_PY" "${ARGS[@]}" --batch_size 32 --lr 2e-5 --weight_decay 0.01 "${GLOBAL_EXTRA[@]}" \
    train_single --model_name "$TEACHER_INIT" --from_pretrained --n_epochs 10 --warmup_prop 0.1 \
    --valid_patience 5 --lr_drop_patience 2 --lr_drop_div 1.5 --min_lr 1e-7 "$@"
}

# distil TASK VARIANT [distil_teacher flags]: task loss + KL (T = 5) on the logits, plus for VARIANT
#   kl               nothing else
#   kl_mse           MSE on all-layer-averaged hidden states projected to the teacher's size (lr 5e-4)
#   kl_contrastive   contrastive loss with student negatives (lr 1e-5)
#   kl_hyperbolic    contrastive loss in a Poincare ball of curvature estimated from the teacher's hidden
#                    states, HypLinear projections to the student's width (lr 1e-5)
# 4 epochs, batch 32 x 4 accumulation, AdamW (weight decay 0.01), linear schedule, as in the paper.
distil() {
  local task="$1" variant="$2"
  shift 2
  local teacher="${TEACHER:-$DUMPS_ROOT/$task/teacher/best_model}"
  local init="${STUDENT_INIT:-$DUMPS_ROOT/$task/student_init}"
  local lr=5e-4
  local extra=()
  case "$variant" in
    kl) ;;
    kl_mse) extra=(--alpha_mse 0.1 --projection_strategy average_by_layers --project_to teacher) ;;
    kl_contrastive)
      lr=1e-5
      extra=(--alpha_contrastive 0.1 --n_negative_samples 32 --negative_sampling_strategy student
             --projection_strategy average_by_layers --project_to teacher) ;;
    kl_hyperbolic)
      lr=1e-5
      extra=(--alpha_contrastive 0.1 --n_negative_samples 32 --negative_sampling_strategy student
             --projection_strategy average_by_layers --project_to student) ;;
    *) echo "error: unknown distillation variant $variant" >&2; return 2 ;;
  esac
  local weights=()
  if [[ -e "$init" ]]; then
    weights=(--student_weights "$init")
  else
    echo "note: $init does not exist: the student starts from random weights (build it with" \
         "preprocessing/init_weights.py in fine-tuning mode from $teacher)" >&2
  fi
  local hyperbolic=()
  if [[ "$variant" == kl_hyperbolic ]]; then
    hyperbolic=(hyperbolic --init_c precompute_from_teacher --n_samples_to_precompute_c 1000 --n_components 100
                --n_tries 3 --use_hyperbolic_projections)
  fi
  common_args "$task" "$DUMPS_ROOT/$task/distil_$variant"
  set -x
  "$PYTHON" "$TRAIN_PY" "${ARGS[@]}" --batch_size 32 --gradient_accumulation_steps 4 --lr "$lr" \
    --weight_decay 0.01 --alpha_task 1.0 "${GLOBAL_EXTRA[@]}" \
    distil_teacher --teacher_name "$teacher" --student_name "$STUDENT_CONFIG" "${weights[@]}" \
    --alpha_kl 1.0 --temperature 5 --n_epochs 4 --warmup_prop 0.0001 "${extra[@]}" "$@" "${hyperbolic[@]}"
}
