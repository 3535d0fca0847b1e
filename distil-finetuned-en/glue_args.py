"""Command-line flags of `distil-finetuned-en/train.py` and their validation (one-line errors before any
heavy work). The orchestration lives in `glue_cli.py`."""

from __future__ import annotations

import argparse
from pathlib import Path

from glue_tasks import TASKS

from kdcore.errors import UserError
from kdcore.hidden_args import add_hyperbolic_subcommand

DESCRIPTION = ("Fine-tune a model on a GLUE task (train_single) or distil a fine-tuned teacher into a student "
               "(distil_teacher), offline, from the GLUE TSV folders on disk.")

# The choices of kdcore/hidden_projection.py and custom_step.py, spelled out so that parsing the command line does
# not import torch (a test checks they are the same).
PROJECTION_STRATEGIES = ("last", "skip", "average", "average_by_layers", "weighted_average_by_layers",
                         "select_by_ids", "pool_and_project")
ADJUST_C = ("train_exp_map_teacher", "train_exp_map_student", "recompute_after_epoch")
NEGATIVE_SAMPLING = ("student", "teacher", "teacher_and_student")


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task and data")
    g.add_argument("--glue_dataset", required=True, choices=list(TASKS),
                   help="GLUE task, or single_sentence: SST-2-format TSVs (sentence<TAB>label, labels 0..K-1) "
                        "directly in --glue_dir")
    g.add_argument("--glue_dir", required=True,
                   help="GLUE root holding CoLA/ SST-2/ MRPC/ QQP/ STS-B/ MNLI/ QNLI/ RTE/ WNLI/ (for single_sentence: "
                        "the folder with train.tsv and dev.tsv)")
    g.add_argument("--num_labels", type=int, help="single_sentence: number of classes K (default: largest label + 1)")
    g.add_argument("--bad_rows", choices=("error", "skip"), default="error",
                   help="a malformed TSV row stops the run (error) or is dropped and counted (skip, at most 1%%)")
    g.add_argument("--tokenizer_name", help="tokenizer directory (shared by teacher and student)")
    g.add_argument("--pipeline_dir", help="a run_pipeline.py --out_dir: its student tokenizer fills --tokenizer_name "
                   "and, for distil_teacher, its student config directory fills --student_name, where not given")
    g.add_argument("--tokenizer_params",
                   help="YAML with max_length (default 128, or the models' max_position_embeddings when "
                        "smaller), padding (longest | max_length), truncation (longest_first | only_first | "
                        "only_second)")

    g = p.add_argument_group("output")
    g.add_argument("--dumps_dir", required=True, help="output directory (results.json, best_model/, tensorboard/)")
    g.add_argument("--force", action="store_true", help="replace a non-empty --dumps_dir")
    g.add_argument("--log_after_n_steps", type=int, default=0,
                   help="validate (and log) every N updates; 0: only per epoch / at the end")
    g.add_argument("--log_after_epoch", action=argparse.BooleanOptionalAction, default=True,
                   help="validate after every epoch")
    g.add_argument("--train_eval_examples", type=int, default=20000,
                   help="results.json's train metrics use this many random training examples (0: all)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=32)
    g.add_argument("--eval_batch_size", type=int, help="default: 2 x --batch_size")
    g.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (AdamW)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many updates (0: --n_epochs decides)")
    g.add_argument("--alpha_task", type=float, default=1.0, help="weight of the task loss (CE, or MSE for STS-B)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast precision")


def _add_train_single(sub) -> None:
    p = sub.add_parser("train_single", help="fine-tune one model (a teacher, or a student without distillation)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name", required=True, help="HF model directory (config.json, maybe weights)")
    p.add_argument("--from_pretrained", action="store_true",
                   help="load --model_name's weights (e.g. a pretrained MLM: encoder kept, new task head); "
                        "default: random init from the config")
    p.add_argument("--n_epochs", type=int, default=3)
    p.add_argument("--warmup_prop", type=float, default=0.0, help="share of updates with linear warm-up")
    p.add_argument("--valid_patience", type=int, default=0, help="stop after N validations without a new best (0: never)")
    p.add_argument("--lr_drop_patience", type=int, default=0,
                   help="divide the lr by --lr_drop_div after N validations without a new best (0: never)")
    p.add_argument("--lr_drop_div", type=float, default=1.5)
    p.add_argument("--min_lr", type=float, default=0.0, help="the lr drops never go below this")


def _add_distil(sub) -> None:
    p = sub.add_parser("distil_teacher", help="task-specific distillation of a fine-tuned teacher",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher_name", required=True, help="fine-tuned teacher directory (train_single's best_model)")
    p.add_argument("--teacher_weights", help="teacher weights (HF directory or state-dict file; default: --teacher_name)")
    p.add_argument("--student_name", help="student directory with config.json (or --pipeline_dir)")
    p.add_argument("--student_weights",
                   help="initial student weights (HF directory or state-dict file, e.g. init_weights.py's output); "
                        "default: random init")
    p.add_argument("--n_epochs", type=int, default=4)
    p.add_argument("--warmup_prop", type=float, default=0.0, help="linear warm-up share, then linear decay to 0")
    p.add_argument("--valid_patience", type=int, default=0, help="stop after N validations without a new best (0: never)")
    g = p.add_argument_group("logits")
    g.add_argument("--alpha_kl", type=float, default=1.0,
                   help="weight of T^2 KL on the logits (STS-B: MSE between teacher and student scores)")
    g.add_argument("--temperature", type=float, default=2.0)
    g.add_argument("--train_temperature", action="store_true",
                   help="learn the temperature (initialised at --temperature)")
    g = p.add_argument_group("hidden states", "MSE / cosine / contrastive terms on the hidden states of every "
                             "real position (one row per example with pool_and_project), see kdcore/hidden_projection.py")
    g.add_argument("--alpha_mse", type=float, default=0.0, help="weight of MSE on projected hidden states")
    g.add_argument("--alpha_cos", type=float, default=0.0, help="weight of the cosine loss on hidden states")
    g.add_argument("--alpha_contrastive", type=float, default=0.0, help="weight of the contrastive (InfoNCE) loss")
    g.add_argument("--projection_strategy", choices=PROJECTION_STRATEGIES, default="average_by_layers",
                   help="which teacher and student layers are compared")
    g.add_argument("--t_s_layers_ids", help='select_by_ids: JSON {"teacher": [4, 8, 12], "student": [1, 2, 3]} '
                   "(hidden-state indices, 0 = embeddings)")
    g.add_argument("--project_to", choices=("teacher", "student", "intermediate"), default="teacher",
                   help="common space: the teacher's width, the student's, or --intermediate_dim")
    g.add_argument("--intermediate_dim", type=int, help="width of the common space with --project_to intermediate")
    g.add_argument("--train_projections", action=argparse.BooleanOptionalAction, default=True,
                   help="train the projections with the student")
    g.add_argument("--train_weights", action=argparse.BooleanOptionalAction, default=True,
                   help="train the layer weights of weighted_average_by_layers and pool_and_project")
    g.add_argument("--n_negative_samples", type=int, default=-1, help="negatives per positive (-1: all)")
    g.add_argument("--negative_sampling_strategy", choices=NEGATIVE_SAMPLING, default="student",
                   help="negatives from the student's rows, the teacher's, or both")
    g.add_argument("--teacher_student_prop", type=float, default=0.5,
                   help="teacher_and_student: share of the negatives taken from the teacher")
    g.add_argument("--contrastive_temperature", type=float,
                   help="temperature of the InfoNCE loss (default: --temperature, as train.py)")
    g.add_argument("--from_one_sample", action="store_true", help="negatives only from the anchor's own example")
    g.add_argument("--add_neg_size_constant", action="store_true",
                   help="add the NCE noise term K / (training examples) to the InfoNCE denominator")
    add_hyperbolic_subcommand(p, adjust_c=ADJUST_C, delta_vectors=("hidden", "logits"),
                              delta_vectors_help="vectors c is estimated from: last hidden states at real "
                              "positions, or classifier logits", init_c_data="the dev set, before training")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distil-finetuned-en/train.py", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_common(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="{train_single,distil_teacher}")
    _add_train_single(sub)
    _add_distil(sub)
    return p


def fill_from_pipeline(a: argparse.Namespace) -> None:
    """`--pipeline_dir`: the pipeline's student tokenizer for --tokenizer_name and, for distil_teacher, its student
    directory for --student_name, where the command line leaves them out (explicit flags win)."""
    from kdcore.artifacts import PipelineDir

    flags = ["tokenizer_name"] + (["student_name"] if a.command == "distil_teacher" else [])
    pipe = PipelineDir(a.pipeline_dir)
    for flag in flags:
        if not getattr(a, flag):
            setattr(a, flag, pipe.path("student_name"))


def validate_args(a: argparse.Namespace) -> None:
    """Fill the flags that `--pipeline_dir` gives, then reject inconsistent flags before any heavy work (one-line
    errors)."""
    if a.pipeline_dir:
        fill_from_pipeline(a)
    for flag in ("tokenizer_name", *(["student_name"] if a.command == "distil_teacher" else [])):
        if not getattr(a, flag):
            raise UserError(f"--{flag} is required (or --pipeline_dir, which fills it)")
    for flag in ("batch_size", "gradient_accumulation_steps", "n_epochs"):
        if getattr(a, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if a.eval_batch_size is not None and a.eval_batch_size < 1:
        raise UserError("--eval_batch_size must be at least 1")
    for flag in ("max_steps", "log_after_n_steps", "train_eval_examples", "valid_patience"):
        if getattr(a, flag) < 0:
            raise UserError(f"--{flag} must not be negative")
    if a.lr <= 0:
        raise UserError(f"--lr {a.lr} must be positive")
    if not 0 <= a.warmup_prop < 1:
        raise UserError(f"--warmup_prop {a.warmup_prop} must be in [0, 1)")
    if a.num_labels is not None and a.num_labels < 2:
        raise UserError(f"--num_labels {a.num_labels} must be at least 2")
    alphas = ["alpha_task"] + (["alpha_kl", "alpha_mse", "alpha_cos", "alpha_contrastive"]
                               if a.command == "distil_teacher" else [])
    for flag in alphas:
        if getattr(a, flag) < 0:
            raise UserError(f"--{flag} must not be negative")
    if a.command == "train_single":
        if a.alpha_task <= 0:
            raise UserError("train_single trains on the task loss only: --alpha_task must be positive")
        if a.lr_drop_patience < 0 or a.lr_drop_div <= 1:
            raise UserError("--lr_drop_patience must be >= 0 and --lr_drop_div > 1")
        if not 0 <= a.min_lr < a.lr:
            raise UserError(f"--min_lr {a.min_lr} must be in [0, --lr)")
    else:
        if sum(getattr(a, flag) for flag in alphas) <= 0:
            raise UserError("all loss weights are 0; set --alpha_task, --alpha_kl, --alpha_mse, --alpha_cos or "
                            "--alpha_contrastive")
        if a.temperature <= 0:
            raise UserError(f"--temperature {a.temperature} must be positive")
        from hidden_terms import validate

        validate(a)
    if not Path(a.glue_dir).is_dir():
        raise UserError(f"--glue_dir {a.glue_dir} is not a directory")
    dump = Path(a.dumps_dir)
    if dump.exists() and not dump.is_dir():
        raise UserError(f"--dumps_dir {dump} is a file; choose a directory")
    if dump.is_dir() and any(dump.iterdir()) and not a.force:
        raise UserError(f"--dumps_dir {dump} already exists and is not empty; pass --force to replace it")
