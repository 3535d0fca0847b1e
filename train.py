"""Distillation (or MLM-only training) of a student masked LM: parse and validate the arguments, build
the data, models, alignment plan and `Distiller`, and run it. Launch with `python train.py ...` for one
process or `./train_multi_gpu.sh ...` (torchrun) for several.

Logit alignment (`--align_logits`):
- `match`: KL at positions where teacher and student hold the same token over the same text span (the
  shards' match masks), over the matched vocabulary (`--matching_ids matched_vocab.json`);
- `reduce`: the student also runs on the t2s sequence (`--t2s_mapping teacher2student.json`); its piece
  logits are pooled (sum, or mean with `--average_logits`) onto every teacher position; KL over the
  matched vocabulary; with `--t2s_vocab_padded t2s_padded.npy --t2s_mapped_ids t2s_mapped_ids.npy` this
  becomes reduce-map: KL over every mapped teacher token, scored as the sum of its pieces' logits (or
  their logsumexp with `--sum_probs`); `--s2t_vocab_padded/--s2t_idxs_padded` select the `my_index`
  implementation.
- shared vocabulary (the teacher's and the student's tokenizers are identical, e.g. the pipeline run with
  `--student_tokenizer TEACHER_DIR`): recognised automatically, `--align_logits` and the maps are not
  needed; as in DistilBERT both models read the same masked ids and the KL covers every non-pad position
  (only the MLM targets with `--restrict_ce_to_mask`) over the whole vocabulary.
Without `--teacher_name` only the MLM loss is trained (the no-distillation baseline, or pretraining).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from pathlib import Path

import numpy as np

from kdcore.artifacts import (
    check_fingerprints,
    load_counts,
    load_matched_vocab,
    load_s2t,
    load_t2s_mapped_ids,
    load_t2s_padded,
    load_teacher2student,
    read_manifest,
)
from kdcore.errors import UserError
from kdcore.fsutil import atomic_write_json

ALIGN_CHOICES = ("match", "reduce")


def build_parser() -> argparse.ArgumentParser:
    # no abbreviated options: the main parser would read the trailing sub-command's options (--c) as
    # ambiguous abbreviations of its own
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("output")
    g.add_argument("--dump_path", required=True, help="output directory: final student, best/, checkpoints/, logs")
    g.add_argument("--force", action="store_true", help="overwrite an existing --dump_path")
    g.add_argument("--tensorboard_logs_path", help="TensorBoard root (default: <dump_path>/tensorboard)")
    g.add_argument("--tensorboard_log_name", default="run", help="TensorBoard run name")
    g.add_argument("--log_interval", type=int, default=50, help="updates between training logs")
    g.add_argument("--checkpoint_interval", type=int, default=1000, help="updates between validations/checkpoints")
    g.add_argument("--load_from_checkpoint", help="resume from dump_path/checkpoints/<step> (or a dump_path)")

    g = p.add_argument_group("data and models")
    g.add_argument("--binarized_data_folder", required=True, help="shard set (OUT/processed_binarized)")
    g.add_argument("--student_name", required=True, help="student directory with config.json and tokenizer")
    g.add_argument("--student_pretrained_weights", help="initial student: HF directory or state-dict file")
    g.add_argument("--teacher_name", help="teacher BertForMaskedLM directory (omit for MLM-only training)")
    g.add_argument("--student_token_counts", help="student_counts.npy (MLM masking probabilities)")

    g = p.add_argument_group("losses")
    g.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the KL term")
    g.add_argument("--alpha_ce", type=float, default=0.0, help="weight of the KL (distillation) loss")
    g.add_argument("--alpha_mlm", type=float, default=0.0, help="weight of the student's own MLM loss")
    g.add_argument("--mlm_mask_prop", type=float, default=0.15, help="share of student tokens to predict")
    g.add_argument("--word_mask", type=float, default=0.8, help="share of targets replaced by [MASK]")
    g.add_argument("--word_keep", type=float, default=0.1, help="share of targets kept")
    g.add_argument("--word_rand", type=float, default=0.1, help="share of targets replaced by a random token")
    g.add_argument("--mlm_smoothing", type=float, default=0.7,
                   help="masking probability ~ count^(-mlm_smoothing): rarer tokens are masked more often")
    g.add_argument("--restrict_ce_to_mask", action="store_true",
                   help="shared vocabulary: KL only at the MLM targets instead of every non-pad position")

    g = p.add_argument_group("alignment")
    g.add_argument("--align_logits", choices=ALIGN_CHOICES, default="match", help="see the module docstring")
    g.add_argument("--matching_ids", help="matched_vocab.json: the columns compared by match and reduce")
    g.add_argument("--t2s_mapping", help="teacher2student.json: builds the t2s input of reduce")
    g.add_argument("--t2s_vocab_padded", help="t2s_padded.npy: turns reduce into reduce-map")
    g.add_argument("--t2s_mapped_ids", help="t2s_mapped_ids.npy: the teacher columns of reduce-map")
    g.add_argument("--s2t_vocab_padded", help="s2t_padded.npy: use my_index for reduce-map")
    g.add_argument("--s2t_idxs_padded", help="s2t_idxs_padded.npy: use my_index for reduce-map")
    g.add_argument("--sum_probs", action="store_true", help="reduce-map scores = logsumexp of the pieces")
    g.add_argument("--average_logits", action="store_true", help="reduce pools pieces by mean instead of sum")
    g.add_argument("--reduce_map_impl", choices=("sparse", "gather", "my_index", "my_index_gather"),
                   help="reduce-map implementation (default: my_index with the s2t maps, else sparse)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--n_epoch", type=int, default=3)
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many updates (0: n_epoch decides)")
    g.add_argument("--batch_size", type=int, default=5, help="sequences per process and micro-batch")
    g.add_argument("--group_by_size", action=argparse.BooleanOptionalAction, default=True,
                   help="batch sequences of similar lengths")
    g.add_argument("--gradient_accumulation_steps", type=int, default=50)
    g.add_argument("--learning_rate", type=float, default=5e-4)
    g.add_argument("--warmup_prop", type=float, default=0.05, help="share of updates with linear warm-up")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-6)
    g.add_argument("--max_grad_norm", type=float, default=5.0)
    g.add_argument("--valid_prop", type=float, default=0.1, help="share of every shard held out for validation")
    g.add_argument("--valid_epochs_patience", type=int, default=0,
                   help="stop after this many validations without improvement (0: never)")
    g.add_argument("--reduce_factor", type=float, default=0.5, help="learning-rate factor on a plateau")
    g.add_argument("--freeze_pos_embs", action="store_true", help="do not train the student's position embeddings")
    g.add_argument("--freeze_token_type_embds", action="store_true",
                   help="do not train the student's token-type embeddings (BERT students)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast precision")
    add_hidden_arguments(p)
    return p


def validate_args(a: argparse.Namespace) -> None:
    """Reject inconsistent arguments before any heavy work (one-line errors)."""
    if a.alpha_ce < 0 or a.alpha_mlm < 0:
        raise UserError("--alpha_ce and --alpha_mlm must not be negative")
    hidden_alphas = a.alpha_mse + a.alpha_cos + a.alpha_contrastive
    if a.alpha_ce + a.alpha_mlm + hidden_alphas <= 0:
        raise UserError("the loss weights sum to zero; set --alpha_ce and/or --alpha_mlm")
    if a.alpha_ce > 0 and not a.teacher_name:
        raise UserError("--alpha_ce > 0 needs a teacher: pass --teacher_name")
    if a.teacher_name and a.alpha_ce == 0 and hidden_alphas == 0:
        raise UserError("--teacher_name is given but --alpha_ce is 0; set --alpha_ce (or a hidden-state loss) or "
                        "drop the teacher")
    if abs(a.word_mask + a.word_keep + a.word_rand - 1.0) > 1e-6:
        raise UserError("--word_mask + --word_keep + --word_rand must sum to 1")
    if not 0 < a.mlm_mask_prop < 1:
        raise UserError(f"--mlm_mask_prop {a.mlm_mask_prop} must be in (0, 1)")
    if not 0 <= a.valid_prop < 1:
        raise UserError(f"--valid_prop {a.valid_prop} must be in [0, 1)")
    for flag in ("batch_size", "gradient_accumulation_steps", "n_epoch", "log_interval", "checkpoint_interval"):
        if getattr(a, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    a.shared_vocab = bool(a.teacher_name) and shared_vocabulary(a.teacher_name, a.student_name)
    if a.restrict_ce_to_mask and not a.shared_vocab:
        raise UserError("--restrict_ce_to_mask needs a teacher with the student's vocabulary (shared-vocabulary "
                        "distillation); with different vocabularies --align_logits chooses the positions")
    if a.alpha_ce > 0 and not a.shared_vocab:
        reduce_map = a.align_logits == "reduce" and a.t2s_vocab_padded
        if not reduce_map and not a.matching_ids:
            raise UserError(f"--align_logits {a.align_logits} needs --matching_ids (matched_vocab.json)")
        if a.align_logits == "reduce" and not a.t2s_mapping:
            raise UserError("--align_logits reduce needs --t2s_mapping (teacher2student.json) for the t2s input")
        if reduce_map and not a.t2s_mapped_ids:
            raise UserError("reduce-map (--t2s_vocab_padded) needs --t2s_mapped_ids (t2s_mapped_ids.npy)")
        if bool(a.s2t_vocab_padded) != bool(a.s2t_idxs_padded):
            raise UserError("pass both --s2t_vocab_padded and --s2t_idxs_padded, or neither")
        if a.reduce_map_impl in ("my_index", "my_index_gather") and not a.s2t_vocab_padded:
            raise UserError(f"--reduce_map_impl {a.reduce_map_impl} needs --s2t_vocab_padded and --s2t_idxs_padded")
    dump = Path(a.dump_path)
    if dump.exists() and any(dump.iterdir()) and not (a.force or a.load_from_checkpoint):
        raise UserError(f"--dump_path {dump} already exists; pass --force to overwrite it or --load_from_checkpoint "
                        "to resume")
    for flag in ("binarized_data_folder", "student_name"):
        if not Path(getattr(a, flag)).is_dir():
            raise UserError(f"--{flag} {getattr(a, flag)} is not a directory")
    validate_hidden_args(a)


def shared_vocabulary(teacher_name: str, student_name: str) -> bool:
    """True when the teacher's and the student's tokenizers are the same (same vocabulary and rules)."""
    from kdcore.tokenizer_utils import fingerprint, load_tokenizer

    for flag, path in (("--teacher_name", teacher_name), ("--student_name", student_name)):
        if not Path(path).is_dir():
            raise UserError(f"{flag} {path} is not a directory")
    return fingerprint(load_tokenizer(teacher_name, "teacher")) == fingerprint(load_tokenizer(student_name, "student"))


def freeze_embeddings(student, positions: bool, token_types: bool) -> None:
    """Stop training the student's position and/or token-type embeddings (DistilBERT's options)."""
    embeddings = student.base_model.embeddings
    for wanted, attr, flag in ((positions, "position_embeddings", "--freeze_pos_embs"),
                               (token_types, "token_type_embeddings", "--freeze_token_type_embds")):
        if not wanted:
            continue
        module = getattr(embeddings, attr, None)
        if module is None:
            raise UserError(f"{flag}: the student ({student.config.model_type}) has no {attr}")
        module.weight.requires_grad_(False)


def build_kl_plan(a: argparse.Namespace, n_teacher: int, n_student: int, fingerprints: dict[str, str]):
    """The KLPlan for the arguments, or None without distillation."""
    import torch

    from kdcore.step_runner import KLPlan

    if a.alpha_ce == 0:
        return None, None
    if a.shared_vocab:
        return KLPlan("shared", a.temperature, restrict_to_mask=a.restrict_ce_to_mask), None
    t2s_input = load_t2s_input(a, n_teacher, n_student, fingerprints) if a.align_logits == "reduce" else None
    if a.align_logits == "reduce" and a.t2s_vocab_padded:
        from custom_step import reduce_map_matrix

        padded = torch.from_numpy(load_t2s_padded(a.t2s_vocab_padded, n_teacher, n_student))
        mapped = torch.from_numpy(load_t2s_mapped_ids(a.t2s_mapped_ids, n_teacher))
        impl = a.reduce_map_impl or ("my_index" if a.s2t_vocab_padded else "sparse")
        plan = KLPlan("reduce_map", a.temperature, t_columns=mapped, average=a.average_logits, t2s_padded=padded,
                      sum_probs=a.sum_probs, impl=impl)
        if a.s2t_vocab_padded:
            s2t, idxs = load_s2t(a.s2t_vocab_padded, a.s2t_idxs_padded, n_teacher, n_student, padded.shape[1])
            plan.s2t_padded, plan.s2t_idxs_padded = torch.from_numpy(s2t), torch.from_numpy(idxs)
        if impl == "sparse":
            plan.map_matrix = reduce_map_matrix(padded, n_student, mapped)
        return plan, t2s_input
    t_cols, s_cols = load_matched_vocab(a.matching_ids, n_teacher, n_student)
    plan = KLPlan(a.align_logits, a.temperature, t_columns=torch.from_numpy(t_cols),
                  s_columns=torch.from_numpy(s_cols), average=a.average_logits)
    return plan, t2s_input


def load_t2s_input(a: argparse.Namespace, n_teacher: int, n_student: int, fingerprints: dict[str, str]) -> np.ndarray:
    """int64 [V_T, S] splits of every teacher token (pad = V_S) from --t2s_mapping: the collator's t2s input,
    used by the reduce KL and the reduce hidden-state alignment alike."""
    meta = load_teacher2student(a.t2s_mapping)
    check_fingerprints(meta["fingerprints"], fingerprints, a.t2s_mapping)
    if (meta["teacher_vocab_size"], meta["student_vocab_size"]) != (n_teacher, n_student):
        raise UserError(f"{a.t2s_mapping} maps {meta['teacher_vocab_size']} -> {meta['student_vocab_size']} tokens, "
                        f"the tokenizers have {n_teacher} -> {n_student}; rebuild it with the pipeline")
    width = max(1, max(len(s) for s in meta["splits"]))
    t2s_input = np.full((n_teacher, width), n_student, dtype=np.int64)
    for v, split in enumerate(meta["splits"]):
        t2s_input[v, :len(split)] = split
    return t2s_input


# ---------------------------------------------------------------------------------------------------------
# Hidden-state losses (MSE, cosine, contrastive) and the `hyperbolic` sub-command
# ---------------------------------------------------------------------------------------------------------

HIDDEN_HELP = """Hidden-state losses: --alpha_mse/--alpha_cos/--alpha_contrastive compare teacher and student
hidden states at aligned positions (--align_hiddens match: matched positions of the student's own run;
reduce: the student's t2s run, pieces pooled onto teacher positions; with a shared vocabulary every
position), after a layer strategy (--projection_strategy) and a projection (--project_to). The optional
trailing sub-command `hyperbolic` (given after every other option: `train.py ... hyperbolic --c 1.0 ...`)
makes the contrastive similarity the negative Poincare distance at curvature c."""


def add_hidden_arguments(p: argparse.ArgumentParser) -> None:
    """The hidden-state loss options and the optional trailing `hyperbolic` sub-command."""
    from custom_step import NEGATIVE_SAMPLING
    from kdcore.hidden_args import add_hyperbolic_subcommand
    from kdcore.hidden_projection import ADJUST_C, PROJECT_TO, PROJECTION_STRATEGIES

    g = p.add_argument_group("hidden-state losses", HIDDEN_HELP)
    g.add_argument("--alpha_mse", type=float, default=0.0, help="weight of the MSE between hidden states")
    g.add_argument("--alpha_cos", type=float, default=0.0, help="weight of the cosine loss between hidden states")
    g.add_argument("--alpha_contrastive", type=float, default=0.0, help="weight of the contrastive (InfoNCE) loss")
    g.add_argument("--align_hiddens", choices=ALIGN_CHOICES, default="match",
                   help="positions compared by the hidden-state losses (ignored with a shared vocabulary)")
    g.add_argument("--average_hiddens", action="store_true",
                   help="align_hiddens reduce: pool the pieces of a teacher token by mean instead of sum")
    g.add_argument("--projection_strategy", choices=PROJECTION_STRATEGIES, default="average_by_layers",
                   help="which teacher and student layers are compared (see hidden_projection.py)")
    g.add_argument("--t_s_layers_ids", help='select_by_ids: JSON {"teacher": [4, 8, 12], "student": [1, 2, 3]} '
                   "(hidden-state indices, 0 = embeddings)")
    g.add_argument("--project_to", choices=PROJECT_TO, default="teacher",
                   help="common space of the compared states: the teacher's width, the student's, or "
                   "--intermediate_dim")
    g.add_argument("--intermediate_dim", type=int, help="width of the common space with --project_to intermediate")
    g.add_argument("--train_projections", action=argparse.BooleanOptionalAction, default=True,
                   help="train the projections with the student (--no-train_projections: frozen random)")
    g.add_argument("--train_weights", action=argparse.BooleanOptionalAction, default=True,
                   help="train the layer weights of weighted_average_by_layers and pool_and_project")
    g = p.add_argument_group("contrastive loss")
    g.add_argument("--n_negative_samples", type=int, default=-1, help="negatives per positive (-1: all)")
    g.add_argument("--negative_sampling_strategy", choices=NEGATIVE_SAMPLING, default="student",
                   help="negatives from the student's rows, the teacher's, or both")
    g.add_argument("--teacher_student_prop", type=float, default=0.5,
                   help="teacher_and_student: share of the negatives taken from the teacher")
    g.add_argument("--contrastive_temperature", type=float,
                   help="temperature of the contrastive loss (default: --temperature)")
    g.add_argument("--from_one_sample", action="store_true",
                   help="draw the negatives from the anchor's own sequence only, not from the whole batch")
    g.add_argument("--use_mismatched_ids", action="store_true",
                   help="align_hiddens match: unmatched positions join the negative pools")
    g.add_argument("--add_neg_size_constant", action="store_true",
                   help="add the NCE noise term K / (training sequences) to the InfoNCE denominator")
    add_hyperbolic_subcommand(p, adjust_c=ADJUST_C, delta_vectors=("logits", "hidden"),
                              delta_vectors_help="outputs the curvature is estimated from: MLM logits or last "
                              "hidden states", init_c_data="validation data (delta.py)")


def hidden_alignment(a: argparse.Namespace) -> str | None:
    """How the hidden-state losses align rows: "match", "reduce", "shared" (one vocabulary), None when off."""
    if a.alpha_mse + a.alpha_cos + a.alpha_contrastive <= 0:
        return None
    return "shared" if getattr(a, "shared_vocab", False) else a.align_hiddens


def validate_hidden_args(a: argparse.Namespace) -> None:
    """One-line errors for inconsistent hidden-state and hyperbolic options."""
    from kdcore.hidden_args import validate_hidden_losses

    for flag in ("alpha_mse", "alpha_cos", "alpha_contrastive"):
        if getattr(a, flag) < 0:
            raise UserError(f"--{flag} must not be negative")
    align = hidden_alignment(a)
    hyperbolic = a.hidden_distil_type == "hyperbolic"
    if hyperbolic and a.alpha_contrastive <= 0:
        raise UserError("the hyperbolic sub-command changes the contrastive loss; set --alpha_contrastive")
    if align is None:
        return
    if not a.teacher_name:
        raise UserError("the hidden-state losses need a teacher: pass --teacher_name")
    if align == "reduce" and not a.t2s_mapping:
        raise UserError("--align_hiddens reduce needs --t2s_mapping (teacher2student.json) for the t2s input")
    mismatched = a.alpha_contrastive > 0 and a.use_mismatched_ids
    if mismatched and (align != "match" or a.projection_strategy == "pool_and_project"):
        raise UserError("--use_mismatched_ids needs --align_hiddens match with token-level rows (different "
                        "vocabularies, not pool_and_project): only match leaves unmatched positions")
    validate_hidden_losses(a, row="sequence")


def build_hidden_losses(a: argparse.Namespace, student, teacher, align: str | None, n_train: int):
    """The `HiddenLosses` module for the arguments (None when no hidden-state loss is on).

    n_train: training sequences over all processes (the NCE constant of --add_neg_size_constant).
    """
    if align is None:
        return None
    from kdcore.hidden_projection import HiddenConfig, HiddenLosses, HyperbolicConfig, parse_layer_ids

    losses = tuple(name for name in ("mse", "cos", "contrastive") if getattr(a, f"alpha_{name}") > 0)
    hyperbolic = None
    if a.hidden_distil_type == "hyperbolic":
        hyperbolic = HyperbolicConfig(c=a.c, adjust_c=a.adjust_c, riemannian=a.riemannian, train_x=a.train_x,
                                      use_hyperbolic_projections=a.use_hyperbolic_projections, use_bias=a.use_bias)
    cfg = HiddenConfig(
        losses=losses, align=align, strategy=a.projection_strategy,
        layer_ids=parse_layer_ids(a.t_s_layers_ids) if a.projection_strategy == "select_by_ids" else None,
        project_to=a.project_to, intermediate_dim=a.intermediate_dim, train_projections=a.train_projections,
        train_weights=a.train_weights, pooling="mean" if a.average_hiddens else "sum",
        n_negatives=a.n_negative_samples, negative_strategy=a.negative_sampling_strategy,
        teacher_student_prop=a.teacher_student_prop,
        temperature=a.contrastive_temperature if a.contrastive_temperature is not None else a.temperature,
        from_one_sample=a.from_one_sample, use_mismatched_ids=a.use_mismatched_ids,
        noise_prob=1.0 / max(n_train, 1) if a.add_neg_size_constant else 0.0, hyperbolic=hyperbolic)
    t_cfg, s_cfg = teacher.config, student.config
    try:
        return HiddenLosses(cfg, t_cfg.num_hidden_layers, s_cfg.num_hidden_layers, t_cfg.hidden_size,
                            s_cfg.hidden_size)
    except ValueError as err:
        msg = f"{err} (teacher {t_cfg.num_hidden_layers} layers, student {s_cfg.num_hidden_layers})"
        raise UserError(msg) from err


def precompute_curvature(a: argparse.Namespace, hidden, teacher, student, data, collator, dist_info, logger,
                         epoch: int) -> float:
    """Estimate c from the teacher's (--init_c precompute_from_teacher) or else the student's outputs on
    `data` (delta.py; averaged over processes), set it in `hidden`'s hyperbolic layers and return it."""
    from delta import model_curvature

    side = "teacher" if a.init_c == "precompute_from_teacher" else "student"
    model = (teacher if side == "teacher" else student).to(dist_info.device)
    c, details = model_curvature(model, data, collator, side, a.n_samples_to_precompute_c, a.n_components,
                                 a.n_tries, a.batch_size, dist_info.device, a.seed + epoch, a.delta_vectors,
                                 distributed=dist_info.distributed)
    hidden.hyperbolic.set_curvature(c)
    if dist_info.is_master:
        logger.info(f"curvature c = {c:.6g} from {details['n_vectors']} {side} {a.delta_vectors} vectors "
                    f"(relative delta {np.mean(details['delta_rel']):.4g}, PCA {details['n_components']} "
                    f"components){f' after epoch {epoch}' if epoch else ''}")
    return c


def assign_shards(shards: list, rank: int, world_size: int) -> list:
    """Each process reads its own shards (rank, rank + world, ...); more processes than shards is an error."""
    if len(shards) < world_size or len(shards) % world_size:
        raise UserError(f"{len(shards)} shards cannot be shared equally by {world_size} processes; regroup the data "
                        f"with regroup_binarized.py --n_shards {world_size} (or run_pipeline.py --n_shards)")
    return shards[rank::world_size]


def prepare_dump(a: argparse.Namespace) -> None:
    """Create --dump_path once every input has loaded; --force (without resuming) empties it first."""
    dump = Path(a.dump_path).resolve()
    if a.force and not a.load_from_checkpoint and dump.exists():
        inputs = [a.binarized_data_folder, a.student_name, a.student_pretrained_weights, a.teacher_name]
        for path in filter(None, inputs):
            if Path(path).resolve().is_relative_to(dump):
                raise UserError(f"--force would delete {path}, which lies inside --dump_path {dump}; choose "
                                "another --dump_path")
        shutil.rmtree(dump)
    dump.mkdir(parents=True, exist_ok=True)


def run(a: argparse.Namespace) -> int:
    """Build everything and train, in every process of a torchrun job; returns 0. A process that fails raises and
    leaves the process group joined: `end_process` then exits without a collective tear-down."""
    validate_args(a)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from utils import init_distributed, shutdown_distributed

    dist_info = init_distributed(a.device)
    train_process(a, dist_info)
    shutdown_distributed(dist_info)  # after train_process returned: its Distiller and DDP module are garbage now
    return 0


def train_process(a: argparse.Namespace, dist_info) -> None:
    """This process's share of the run: load, check, build, train, export (rank 0 writes)."""
    from custom_step import mlm_token_probs
    from distiller import Distiller
    from kdcore.hidden_projection import curvature_value
    from kdcore.model_io import load_student, load_teacher
    from kdcore.shard_io import open_shards, read_index
    from kdcore.step_runner import StudentRunner
    from kdcore.tokenizer_utils import fingerprint, load_tokenizer, special_tokens
    from lm_seqs_dataset import Collator, LmSeqsDataset
    from setup_logger import setup_logger
    from utils import git_info, set_seed

    with contextlib.ExitStack() as closing:
        dump = Path(a.dump_path)
        logger = setup_logger("train", None, dist_info.rank)
        set_seed(a.seed + dist_info.rank)
        s_tok = load_tokenizer(a.student_name, "student")
        fingerprints = {"student": fingerprint(s_tok)}
        t_tok = None
        if a.teacher_name:
            t_tok = load_tokenizer(a.teacher_name, "teacher")
            fingerprints["teacher"] = fingerprint(t_tok)
        index = read_index(a.binarized_data_folder)
        check_fingerprints(index["fingerprints"], fingerprints, a.binarized_data_folder)
        manifest = read_manifest(Path(a.binarized_data_folder).parent)
        if manifest is not None:
            check_fingerprints(manifest.get("fingerprints", {}), fingerprints, Path(a.binarized_data_folder).parent)
        n_student = len(s_tok)
        if index["student_vocab_size"] != n_student:
            raise UserError(f"{a.binarized_data_folder} holds student ids of a {index['student_vocab_size']}-token "
                            f"vocabulary, the student tokenizer has {n_student}")
        n_teacher = index["teacher_vocab_size"]
        kl, t2s_input = build_kl_plan(a, n_teacher, n_student, fingerprints)
        hidden_align = hidden_alignment(a)
        if hidden_align == "reduce" and t2s_input is None:
            t2s_input = load_t2s_input(a, n_teacher, n_student, fingerprints)
        shards = assign_shards(open_shards(a.binarized_data_folder), dist_info.rank, dist_info.world_size)
        train_data = LmSeqsDataset(shards, a.valid_prop, "train")
        valid_data = LmSeqsDataset(shards, a.valid_prop, "valid")
        if kl is not None and kl.align == "match" and not train_data.has_match:
            raise UserError(f"--align_logits match needs match masks in {a.binarized_data_folder}; run "
                            "find_matching_ids.py on it")
        if hidden_align == "match" and a.projection_strategy != "pool_and_project" and not train_data.has_match:
            raise UserError(f"--align_hiddens match needs match masks in {a.binarized_data_folder}; run "
                            "find_matching_ids.py on it, or use --align_hiddens reduce")
        if len(train_data) == 0:
            raise UserError(f"no training sequences in {a.binarized_data_folder} for this process")
        student = load_student(a.student_name, a.student_pretrained_weights)
        freeze_embeddings(student, a.freeze_pos_embs, a.freeze_token_type_embds)
        if student.config.vocab_size != n_student:
            raise UserError(f"student config vocab_size {student.config.vocab_size} != tokenizer size {n_student}")
        teacher = load_teacher(a.teacher_name) if a.teacher_name else None
        if teacher is not None and teacher.config.vocab_size != n_teacher:
            raise UserError(f"teacher vocab_size {teacher.config.vocab_size} != the shards' teacher vocabulary "
                            f"{n_teacher}")
        s_special = {role: s_tok.convert_tokens_to_ids(tok) for role, tok in special_tokens(s_tok).items()}
        token_probs = None
        if a.alpha_mlm > 0 or (kl is not None and kl.align == "shared"):
            counts = load_counts(a.student_token_counts, n_student) if a.student_token_counts else np.ones(n_student)
            token_probs = mlm_token_probs(counts, a.mlm_smoothing, sorted({int(i) for i in s_tok.all_special_ids}))
        t_pad = t_tok.pad_token_id if t_tok is not None else 0
        collator = Collator(t_pad, s_special["pad"], t2s_input, n_student)
        hidden = build_hidden_losses(a, student, teacher, hidden_align, len(train_data) * dist_info.world_size)
        runner = StudentRunner(student, mlm=a.alpha_mlm > 0, kl=kl, hidden=hidden)
        curvature_source = valid_data if len(valid_data) else train_data
        writer = None
        if dist_info.is_master:
            prepare_dump(a)
            logger = setup_logger("train", dump / "train.log", dist_info.rank)
            from tensorboardX import SummaryWriter

            tb_root = Path(a.tensorboard_logs_path) if a.tensorboard_logs_path else dump / "tensorboard"
            writer = closing.enter_context(SummaryWriter(logdir=str(tb_root / a.tensorboard_log_name)))
            atomic_write_json(dump / "parameters.json", {**vars(a), "world_size": dist_info.world_size,
                                                         "device": str(dist_info.device)})
            atomic_write_json(dump / "git_log.json", git_info(Path(__file__).parent))
            logger.info(f"{dist_info.world_size} process(es) on {dist_info.device}; {len(train_data)} train / "
                        f"{len(valid_data)} valid sequences per process; KL: {kl.align if kl else 'off'}; "
                        f"student {sum(p.numel() for p in student.parameters()):,} parameters")
            if hidden is not None:
                logger.info(f"hidden-state losses {', '.join(hidden.cfg.losses)}: align {hidden_align}, "
                            f"{a.projection_strategy} ({hidden.selector.n_pairs} layer pairs), project to "
                            f"{a.project_to}; {sum(p.numel() for p in hidden.parameters() if p.requires_grad):,} "
                            f"trainable parameters{'; hyperbolic' if hidden.hyperbolic is not None else ''}")
        if hidden is not None and hidden.hyperbolic is not None and a.init_c and not a.load_from_checkpoint:
            precompute_curvature(a, hidden, teacher, student, curvature_source, collator, dist_info, logger, 0)
        distiller = Distiller(a, dist_info, runner, teacher, train_data, valid_data, collator, token_probs, s_special,
                              s_tok, logger, writer)
        if hidden is not None and hidden.hyperbolic is not None and a.adjust_c == "recompute_after_epoch":
            distiller.epoch_end_hooks.append(lambda d: precompute_curvature(
                a, hidden, d.teacher, d.runner.student, curvature_source, collator, dist_info, logger, d.state.epoch))
        if a.load_from_checkpoint:
            distiller.load_checkpoint(a.load_from_checkpoint)
            if dist_info.is_master:
                logger.info(f"resumed at update {distiller.state.global_step} from {a.load_from_checkpoint}")
        state = distiller.train()
        if dist_info.is_master:
            atomic_write_json(dump / "train_summary.json", {
                "global_step": state.global_step, "epoch": state.epoch, "best_valid": state.best_valid,
                "world_size": dist_info.world_size, "rank_param_checksums": distiller.rank_checksums,
                "history": state.history, "curvature": curvature_value(distiller.runner)})
            logger.info(f"done: {state.global_step} updates; student saved in {dump}")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))

if __name__ == "__main__":
    from utils import run_process

    run_process(main)
