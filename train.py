"""Distillation (or MLM-only training) of a student masked LM: parse the command line into a typed
`kdcore.config.TrainConfig`, build the alignment (`kdcore.alignments`), the data, models and `Distiller`, and run
it. Launch with `python train.py ...` for one process or `./train_multi_gpu.sh ...` (torchrun) for several.

    python train.py --pipeline_dir OUT --teacher_name TEACHER --align_logits match --dump_path DUMP [...]

`--pipeline_dir` fills every data and artifact flag that the run reads; an explicit flag overrides it.

Logit alignment (`--align_logits`, chosen explicitly, never inferred from the files given):
- `match`: KL at positions where teacher and student hold the same token over the same text span (the
  shards' match masks), over the matched vocabulary (`--matching_ids matched_vocab.json`);
- `reduce`: the student also runs on the t2s sequence (`--t2s_mapping teacher2student.json`); its piece
  logits are pooled (sum, or mean with `--average_logits`) onto every teacher position; KL over the
  matched vocabulary;
- `--column_map mined` (match and reduce; default `exact`): instead of the matched vocabulary, every non-special
  teacher token, mapped to the student token at minimum edit distance (`--mined_vocab mined_vocab.json`, pipeline
  step 12); the teacher's distribution is summed per mapped student id and compared with the student's softmax
  over those ids;
- `reduce_map`: as reduce, KL over every mapped teacher token (`--t2s_vocab_padded t2s_padded.npy
  --t2s_mapped_ids t2s_mapped_ids.npy`), scored as the sum of its pieces' logits (or their logsumexp with
  `--sum_probs`); `--reduce_map_impl sparse` (default, exact) or `my_index` (inverse maps `--s2t_vocab_padded`,
  `--s2t_idxs_padded`; a partial-sum gradient when the pipeline capped them, logged once);
- shared vocabulary (the teacher's and the student's tokenizers are identical, e.g. the pipeline run with
  `--student_tokenizer TEACHER_DIR`): recognised automatically; as in DistilBERT both models read the same
  masked ids and the KL covers every non-pad position (only the MLM targets with `--restrict_ce_to_mask`)
  over the whole vocabulary;
- `uld`: Universal Logit Distillation (Boizard et al., 2024), no vocabulary map: at match positions
  (`--uld_positions match`, the default, reading the shards' match masks only) or reduce positions
  (`--uld_positions reduce`, `--t2s_mapping`), the L1 distance between the teacher's probabilities over its whole
  vocabulary and the student's over its whole vocabulary at `--temperature`, each sorted in decreasing order
  (the shorter padded with zeros), averaged over the aligned positions; logged as loss_ce. No `--teacher_cache`.
- `dskd`: Dual-Space KD with cross-model attention (Zhang et al., 2024; `kdcore/dual_space.py`), no artifacts:
  trainable projections and a learned attention between all real teacher and student tokens; KL in the teacher's
  space over its whole vocabulary (loss_ce), KL in the student's space (loss_kl_student_space) and the projected
  teacher's cross-entropy (loss_projector_ce), all weighted by `--alpha_ce`; the projections are checkpointed,
  not exported, and learn at `--aligner_lr_scale` times the learning rate. No `--teacher_cache`.
An artifact flag that the chosen alignment does not read is an error.
Without `--teacher_name` only the MLM loss is trained (the no-distillation baseline, or pretraining).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdcore.alignments import COLUMN_MAPS, EXACT_REDUCE_MAP_IMPLS, ULD_POSITIONS, selectable_alignments
from kdcore.artifacts import check_fingerprints, load_counts, read_manifest
from kdcore.config import NONFINITE_POLICIES, RESUME_MODES, TrainConfig
from kdcore.errors import UserError
from kdcore.fsutil import atomic_write_json, remove_stale_temps
from kdcore.tb_log import ScalarLog

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from kdcore.alignments import AlignmentPlan
    from kdcore.hidden_projection import HiddenLosses
    from kdcore.step_runner import StudentRunner
    from kdcore.teacher_cache import TeacherCache
    from lm_seqs_dataset import Collator, LmSeqsDataset


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
    g.add_argument("--load_from_checkpoint", help="resume from dump_path/checkpoints/<step> (or a dump_path: its "
                   "newest complete checkpoint)")
    g.add_argument("--resume", choices=RESUME_MODES, default="never",
                   help="auto: resume from the newest complete checkpoint in --dump_path when there is one, else start; "
                        "relaunching the same command after a crash continues the run")

    g = p.add_argument_group("data and models")
    g.add_argument("--pipeline_dir", help="a run_pipeline.py --out_dir: fills every data and artifact flag below that "
                   "the run reads and the command line leaves out")
    g.add_argument("--binarized_data_folder", help="shard set (OUT/processed_binarized)")
    g.add_argument("--student_name", help="student directory with config.json and tokenizer (OUT/student)")
    g.add_argument("--student_pretrained_weights", help="initial student: HF directory or state-dict file")
    g.add_argument("--teacher_name", help="teacher BertForMaskedLM directory (omit for MLM-only training)")
    g.add_argument("--teacher_cache", help="a preprocessing/cache_teacher.py cache: the KL term reads the teacher's "
                   "stored distributions instead of running the teacher (which is then loaded only for hidden-state "
                   "losses); it must match the teacher, shards, alignment and temperature")
    g.add_argument("--student_token_counts", help="student_counts.npy (MLM masking probabilities)")

    g = p.add_argument_group("losses")
    g.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the KL term")
    g.add_argument("--alpha_ce", type=float,
                   help="weight of the KL (distillation) loss (default: 2.0, the paper's, with --teacher_name; 0 without)")
    g.add_argument("--alpha_mlm", type=float,
                   help="weight of the student's own MLM loss (default: 0.5, the paper's, with --teacher_name; 1.0 "
                   "without)")
    g.add_argument("--mlm_mask_prop", type=float, default=0.15, help="share of student tokens to predict")
    g.add_argument("--word_mask", type=float, default=0.8, help="share of targets replaced by [MASK]")
    g.add_argument("--word_keep", type=float, default=0.1, help="share of targets kept")
    g.add_argument("--word_rand", type=float, default=0.1, help="share of targets replaced by a random token")
    g.add_argument("--mlm_smoothing", type=float, default=0.7,
                   help="masking probability ~ count^(-mlm_smoothing): rarer tokens are masked more often")
    g.add_argument("--restrict_ce_to_mask", action="store_true",
                   help="shared vocabulary: KL only at the MLM targets instead of every non-pad position")

    g = p.add_argument_group("alignment (the artifact flags are filled by --pipeline_dir; one the chosen alignment "
                             "does not read is an error)")
    g.add_argument("--align_logits", choices=selectable_alignments(), default="match",
                   help="positions and columns of the KL term (see the module docstring; with one vocabulary the "
                   "alignment is always shared)")
    g.add_argument("--column_map", choices=COLUMN_MAPS, default="exact",
                   help="columns of match and reduce: exact (the matched vocabulary, --matching_ids) or mined (every "
                   "teacher token, its distribution projected onto the student token at minimum edit distance, "
                   "--mined_vocab)")
    g.add_argument("--matching_ids", help="matched_vocab.json: the columns compared by match and reduce")
    g.add_argument("--mined_vocab", help="mined_vocab.json: the MinED column map of --column_map mined")
    g.add_argument("--t2s_mapping", help="teacher2student.json: the t2s input of reduce and reduce_map")
    g.add_argument("--t2s_vocab_padded", help="t2s_padded.npy: the teacher tokens' pieces (reduce_map)")
    g.add_argument("--t2s_mapped_ids", help="t2s_mapped_ids.npy: the teacher columns of reduce_map")
    g.add_argument("--s2t_vocab_padded", help="s2t_padded.npy: the inverse map of --reduce_map_impl my_index")
    g.add_argument("--s2t_idxs_padded", help="s2t_idxs_padded.npy: the inverse map of --reduce_map_impl my_index")
    g.add_argument("--sum_probs", action="store_true", help="reduce_map scores = logsumexp of the pieces")
    g.add_argument("--average_logits", action="store_true", help="reduce pools pieces by mean instead of sum")
    g.add_argument("--reduce_map_impl", choices=EXACT_REDUCE_MAP_IMPLS, default="sparse",
                   help="reduce_map implementation: sparse (exact gradient) or my_index (inverse-map backward: with "
                   "the pipeline's capped inverse map a partial-sum gradient, see README)")
    g.add_argument("--uld_positions", choices=tuple(ULD_POSITIONS),
                   help="--align_logits uld: the positions compared (default match: same token over the same text; "
                   "reduce: every teacher position, the student's t2s pieces' logits pooled onto it, --average_logits "
                   "for mean)")

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
    g.add_argument("--on_nonfinite", choices=NONFINITE_POLICIES, default="stop",
                   help="an update with a NaN/inf loss term (or, in fp32/bf16, gradient norm) on any process: stop "
                   "the run naming the terms and the last checkpoint, or skip it (no optimizer, schedule or step "
                   "counter advance; the batches are consumed)")
    g.add_argument("--max_nonfinite_skips", type=int, default=10,
                   help="--on_nonfinite skip: stop after this many consecutive skipped updates")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--dist_timeout_s", type=int, default=1800,
                   help="seconds a collective waits for a peer before the job fails (torchrun)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast precision")
    g.add_argument("--teacher_precision", choices=("fp32", "bf16", "fp16"),
                   help="autocast precision of the frozen teacher's forward (default: --precision)")
    g.add_argument("--aligner_lr_scale", type=float, default=1.0,
                   help="learning-rate multiplier of the alignment's trainable part (--align_logits dskd: its "
                   "projections and query map, which start from random weights), through warm-up and plateaus")
    add_hidden_arguments(p)
    return p



HIDDEN_HELP = """Hidden-state losses: --alpha_mse/--alpha_cos/--alpha_contrastive compare teacher and student
hidden states at aligned positions (--align_hiddens match: matched positions of the student's own run;
reduce: the student's t2s run, pieces pooled onto teacher positions; with a shared vocabulary every
position), after a layer strategy (--projection_strategy) and a projection (--project_to). The optional
trailing sub-command `hyperbolic` (given after every other option: `train.py ... hyperbolic --c 1.0 ...`)
makes the contrastive similarity the negative Poincare distance at curvature c."""


def add_hidden_arguments(p: argparse.ArgumentParser) -> None:
    """The hidden-state loss options and the optional trailing `hyperbolic` sub-command."""
    from custom_step import NEGATIVE_SAMPLING
    from kdcore.alignments import HIDDEN_POSITIONS
    from kdcore.hidden_args import add_hyperbolic_subcommand
    from kdcore.hidden_projection import ADJUST_C, PROJECT_TO, PROJECTION_STRATEGIES

    g = p.add_argument_group("hidden-state losses", HIDDEN_HELP)
    g.add_argument("--alpha_mse", type=float, default=0.0, help="weight of the MSE between hidden states")
    g.add_argument("--alpha_cos", type=float, default=0.0, help="weight of the cosine loss between hidden states")
    g.add_argument("--alpha_contrastive", type=float, default=0.0, help="weight of the contrastive (InfoNCE) loss")
    g.add_argument("--align_hiddens", choices=tuple(HIDDEN_POSITIONS), default="match",
                   help="positions compared by the hidden-state losses (ignored with a shared vocabulary)")
    g.add_argument("--average_hiddens", action="store_true",
                   help="align_hiddens reduce: pool the pieces of a teacher token by mean instead of sum")
    g.add_argument("--projection_strategy", choices=PROJECTION_STRATEGIES, default="average_by_layers",
                   help="which teacher and student layers are compared (see kdcore/hidden_projection.py)")
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


def assign_shards(shards: list, rank: int, world_size: int) -> list:
    """Each process reads its own shards (rank, rank + world, ...); more processes than shards is an error."""
    if len(shards) < world_size or len(shards) % world_size:
        raise UserError(f"{len(shards)} shards cannot be shared equally by {world_size} processes; regroup the data "
                        f"with regroup_binarized.py --n_shards {world_size} (or run_pipeline.py --n_shards)")
    return shards[rank::world_size]


def prepare_dump(cfg: TrainConfig) -> None:
    """Create --dump_path once every input has loaded; --force (without resuming) empties it first."""
    dump = cfg.output.dump_path.resolve()
    if cfg.output.force and not cfg.output.load_from_checkpoint and dump.exists():
        d = cfg.data
        for path in filter(None, [d.binarized_data_folder, d.student_name, d.student_pretrained_weights,
                                  d.teacher_name]):
            if Path(path).resolve().is_relative_to(dump):
                raise UserError(f"--force would delete {path}, which lies inside --dump_path {dump}; choose "
                                "another --dump_path")
        shutil.rmtree(dump)
    dump.mkdir(parents=True, exist_ok=True)


def resume_point(cfg: TrainConfig) -> tuple[Path | None, list[str]]:
    """(the checkpoint this run continues from or None, "path: problem" of each newer checkpoint skipped):
    --load_from_checkpoint (a checkpoint, or a dump_path's newest complete one), or with --resume auto the newest
    complete checkpoint of --dump_path. Every rank reads the same directory, so all decide alike."""
    from distiller import CHECKPOINTS, newest_checkpoint, resolve_checkpoint

    out = cfg.output
    if out.load_from_checkpoint:
        return resolve_checkpoint(out.load_from_checkpoint), []
    if out.resume != "auto":
        return None, []
    found, skipped = newest_checkpoint(out.dump_path)
    if found is None and skipped:
        raise UserError(f"--resume auto: no checkpoint in {out.dump_path / CHECKPOINTS} is complete "
                        f"({'; '.join(skipped)}); pass one with --load_from_checkpoint, or start again with --force")
    return found, skipped


def precompute_curvature(cfg: TrainConfig, hidden, teacher, student, data, collator, dist_info, logger,
                         epoch: int) -> float:
    """Estimate c from the teacher's or the student's outputs on `data` (`delta.sample_output_vectors`, averaged
    over processes by `trainer_core.fit_curvature`), set it in `hidden`'s hyperbolic layers and return it. The
    teacher runs in its precision (`--teacher_precision`), as everywhere in the run (the Distiller may store its
    Linears in that dtype); the student in fp32."""
    from delta import sample_output_vectors
    from kdcore.trainer_core import autocast, fit_curvature

    c = cfg.curvature
    model = (teacher if c.side == "teacher" else student).to(dist_info.device)
    precision = cfg.optim.teacher_autocast if c.side == "teacher" else "fp32"
    with autocast(dist_info.device, precision):
        vectors = sample_output_vectors(model, data, collator, c.side, c.n_samples, cfg.data.batch_size,
                                        dist_info.device, c.seed + epoch, c.delta_vectors)
    return fit_curvature(hidden, vectors, c, epoch, logger if dist_info.is_master else None, dist_info.device,
                         dist_info.distributed)


def open_teacher_cache(cfg: TrainConfig, plan, shards: list, fingerprints: dict[str, str]):
    """The run's teacher cache, opened and checked against its teacher, shards, alignment and temperature."""
    from kdcore.teacher_cache import (
        TeacherCache,
        columns_fingerprint,
        shards_fingerprint,
        teacher_weights_fingerprint,
    )

    cache = TeacherCache.open(cfg.data.teacher_cache)
    kl = plan.kl
    n_columns = cache.header["alignment"]["n_columns"]
    cache.check({"alignment": kl.name, "columns": columns_fingerprint(kl.columns_key(), n_columns),
                 "temperature": cfg.losses.temperature, "teacher_tokenizer": fingerprints["teacher"],
                 "teacher_weights": teacher_weights_fingerprint(cfg.data.teacher_name),
                 "shards": shards_fingerprint(cfg.data.binarized_data_folder)})
    return cache


def run(a: argparse.Namespace, argv: list[str]) -> int:
    """Build everything and train, in every process of a torchrun job; returns 0. `argv`: the command line (for the
    model card). A process that fails raises and leaves the process group joined: `end_process` then exits without
    a collective tear-down."""
    cfg = TrainConfig.from_args(a)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from utils import init_distributed, shutdown_distributed

    dist_info = init_distributed(cfg.loop.device, cfg.loop.dist_timeout_s)
    train_process(cfg, dist_info, argv)
    shutdown_distributed(dist_info)  # after train_process returned: its Distiller and DDP module are garbage now
    return 0


@dataclass
class Run:
    """Everything a process of a run trains with, loaded and checked (`build_run`): the tokenizers, the alignment
    plan, the teacher cache (or None), this process's data, the models (the teacher is None when nothing needs
    it), the student's special-token ids, the MLM masking weights (None without masking), the collator, the
    hidden-state losses (or None) and the `StudentRunner` that the Distiller trains."""

    s_tok: PreTrainedTokenizerFast
    t_tok: PreTrainedTokenizerFast | None
    plan: AlignmentPlan
    cache: TeacherCache | None
    train_data: LmSeqsDataset
    valid_data: LmSeqsDataset
    student: PreTrainedModel
    teacher: PreTrainedModel | None
    special: dict[str, int]
    token_probs: Tensor | None
    collator: Collator
    hidden: HiddenLosses | None
    runner: StudentRunner


def build_run(cfg: TrainConfig, dist_info) -> Run:
    """Load, check and build what this process of the run trains with (nothing is written): train.py's factory,
    also used by the benchmarks."""
    import dataclasses

    import numpy as np

    from custom_step import mlm_token_probs
    from kdcore.alignments import Vocabularies
    from kdcore.model_io import check_vocab_fits, load_student, load_teacher
    from kdcore.shard_io import open_shards, read_index
    from kdcore.step_runner import StudentRunner
    from kdcore.tokenizer_utils import fingerprint, load_tokenizer, special_tokens
    from kdcore.trainer_core import build_hidden_losses
    from lm_seqs_dataset import Collator, LmSeqsDataset

    d = cfg.data
    s_tok = load_tokenizer(d.student_name, "student")
    fingerprints = {"student": fingerprint(s_tok)}
    t_tok = None
    if d.teacher_name:
        t_tok = load_tokenizer(d.teacher_name, "teacher")
        fingerprints["teacher"] = fingerprint(t_tok)
    index = read_index(d.binarized_data_folder)
    check_fingerprints(index["fingerprints"], fingerprints, d.binarized_data_folder)
    manifest = read_manifest(Path(d.binarized_data_folder).parent)
    if manifest is not None:
        check_fingerprints(manifest.get("fingerprints", {}), fingerprints, Path(d.binarized_data_folder).parent)
    n_student = len(s_tok)
    if index["student_vocab_size"] != n_student:
        raise UserError(f"{d.binarized_data_folder} holds student ids of a {index['student_vocab_size']}-token "
                        f"vocabulary, the student tokenizer has {n_student}")
    n_teacher = index["teacher_vocab_size"]
    plan = cfg.alignments(Vocabularies(n_teacher, n_student, fingerprints))
    shards = assign_shards(open_shards(d.binarized_data_folder), dist_info.rank, dist_info.world_size)
    cache = open_teacher_cache(cfg, plan, shards, fingerprints) if d.teacher_cache else None
    cache_rows = [cache.check_rows(s, plan.kl.positions.teacher_row_flags(s)) for s in shards] if cache else None
    train_data = LmSeqsDataset(shards, d.valid_prop, "train", cache_rows)
    valid_data = LmSeqsDataset(shards, d.valid_prop, "valid", cache_rows)
    if not train_data.has_match:
        if plan.kl is not None and plan.kl.positions.needs_match_masks:
            raise UserError(f"--align_logits {plan.kl.name} needs match masks in {d.binarized_data_folder}; run "
                            "find_matching_ids.py on it")
        if plan.hidden is not None and plan.hidden.needs_match_masks and cfg.hidden.strategy != "pool_and_project":
            raise UserError(f"--align_hiddens {plan.hidden.name} needs match masks in {d.binarized_data_folder}; "
                            "run find_matching_ids.py on it, or use --align_hiddens reduce")
    if len(train_data) == 0:
        raise UserError(f"no training sequences in {d.binarized_data_folder} for this process")
    student = load_student(d.student_name, d.student_pretrained_weights)
    freeze_embeddings(student, d.freeze_pos_embs, d.freeze_token_type_embds)
    if student.config.vocab_size != n_student:
        raise UserError(f"student config vocab_size {student.config.vocab_size} != tokenizer size {n_student}")
    needs_teacher = cfg.losses.hidden or (cfg.losses.kl and cache is None)
    teacher = load_teacher(d.teacher_name) if d.teacher_name and needs_teacher else None
    if teacher is not None:
        check_vocab_fits(d.teacher_name, teacher.config.vocab_size, n_teacher)
    special = {role: s_tok.convert_tokens_to_ids(tok) for role, tok in special_tokens(s_tok).items()}
    token_probs = None
    if cfg.losses.alpha_mlm > 0 or (plan.kl is not None and plan.kl.positions.teacher_reads_student_ids):
        counts = load_counts(d.student_token_counts, n_student) if d.student_token_counts else np.ones(n_student)
        token_probs = mlm_token_probs(counts, cfg.mlm.smoothing, sorted({int(i) for i in s_tok.all_special_ids}))
    t_pad = t_tok.pad_token_id if t_tok is not None else 0
    collator = Collator(t_pad, special["pad"], plan.t2s_input, n_student, cache.encoding if cache is not None else None)
    hidden = None
    if cfg.hidden is not None:
        hidden_cfg = cfg.hidden
        if cfg.add_neg_size_constant:
            hidden_cfg = dataclasses.replace(hidden_cfg, noise_prob=1.0 / max(len(train_data) * dist_info.world_size, 1))
        hidden = build_hidden_losses(hidden_cfg, plan.hidden, teacher.config, student.config)
    aligner = plan.kl.aligner(teacher, student) if plan.kl is not None else None
    runner = StudentRunner(student, mlm=cfg.losses.alpha_mlm > 0, kl=plan.kl, hidden=hidden, aligner=aligner)
    return Run(s_tok, t_tok, plan, cache, train_data, valid_data, student, teacher, special, token_probs, collator,
               hidden, runner)


def train_process(cfg: TrainConfig, dist_info, argv: list[str], step_end_hooks: Sequence[Callable] = ()) -> None:
    """This process's share of the run: build (`build_run`), train, export (rank 0 writes). `step_end_hooks`:
    callables f(distiller) run after every applied update (`Distiller.step_end_hooks`; bench/soak.py samples
    memory with one)."""
    from distiller import Distiller
    from kdcore.hidden_projection import curvature_value
    from setup_logger import setup_logger
    from utils import git_info, set_seed

    d = cfg.data
    with contextlib.ExitStack() as closing:
        dump = cfg.output.dump_path
        logger = setup_logger("train", None, dist_info.rank)
        set_seed(cfg.loop.seed + dist_info.rank)
        run = build_run(cfg, dist_info)
        plan, cache, teacher, student, hidden = run.plan, run.cache, run.teacher, run.student, run.hidden
        train_data, valid_data, collator = run.train_data, run.valid_data, run.collator
        curvature_source = valid_data if len(valid_data) else train_data
        writer = None
        checkpoint, skipped = resume_point(cfg)
        resumed_step = int(checkpoint.name) if checkpoint is not None and checkpoint.name.isdigit() else None
        if dist_info.is_master:
            prepare_dump(cfg)
            logger = setup_logger("train", dump / "train.log", dist_info.rank)
            for problem in skipped:
                logger.warning(f"--resume auto: skipping the damaged or incomplete checkpoint {problem}")
            removed = remove_stale_temps(dump)
            if removed:
                logger.info("removed what an interrupted run left half-written: "
                            + ", ".join(str(p.relative_to(dump)) for p in removed))
            out = cfg.output
            tb_root = Path(out.tensorboard_logs_path) if out.tensorboard_logs_path else dump / "tensorboard"
            # resumed: TensorBoard drops the killed run's events after the checkpoint's update
            writer = closing.enter_context(ScalarLog(tb_root / out.tensorboard_log_name,
                                                     purge_step=None if resumed_step is None else resumed_step + 1))
            atomic_write_json(dump / "parameters.json", {**cfg.to_json(), "world_size": dist_info.world_size,
                                                         "device": str(dist_info.device)})
            atomic_write_json(dump / "git_log.json", git_info(Path(__file__).parent))
            logger.info(f"{dist_info.world_size} process(es) on {dist_info.device}; {len(train_data)} train / "
                        f"{len(valid_data)} valid sequences per process; KL: "
                        f"{plan.kl.describe() if plan.kl else 'off'}; student "
                        f"{sum(p.numel() for p in student.parameters()):,} parameters")
            approximation = plan.kl.approximation() if plan.kl is not None else None
            if approximation:
                logger.warning(f"approximation: {approximation}")
            if cache is not None:
                enc = cache.encoding
                logger.info(f"teacher cache {d.teacher_cache}: {enc.name} encoding (k {enc.k}, {enc.dtype}), "
                            f"{enc.bytes_per_row()} bytes per row; teacher model "
                            f"{'loaded for the hidden-state losses' if teacher is not None else 'not loaded'}")
                if enc.approximation:
                    logger.warning(f"approximation: the KL reads a {enc.name} cache ({enc.approximation})")
            if hidden is not None:
                logger.info(f"hidden-state losses {', '.join(hidden.cfg.losses)}: align {plan.hidden.name}, "
                            f"{hidden.cfg.strategy} ({hidden.selector.n_pairs} layer pairs), project to "
                            f"{hidden.cfg.project_to}; {sum(p.numel() for p in hidden.parameters() if p.requires_grad):,} "
                            f"trainable parameters{'; hyperbolic' if hidden.hyperbolic is not None else ''}")
        curvature = cfg.curvature if hidden is not None and hidden.hyperbolic is not None else None
        if curvature is not None and curvature.initial and checkpoint is None:
            precompute_curvature(cfg, hidden, teacher, student, curvature_source, collator, dist_info, logger, 0)
        distiller = Distiller(cfg, dist_info, run.runner, teacher, train_data, valid_data, collator, run.token_probs,
                              run.special, run.s_tok, logger, writer)
        distiller.command = " ".join(shlex.quote(arg) for arg in ["train.py", *argv])
        distiller.step_end_hooks.extend(step_end_hooks)
        if curvature is not None and curvature.recompute_after_epoch:
            distiller.epoch_end_hooks.append(lambda dst: precompute_curvature(
                cfg, hidden, dst.teacher, dst.runner.student, curvature_source, collator, dist_info, logger,
                dst.state.epoch))
        if checkpoint is not None:
            distiller.load_checkpoint(checkpoint)
            if dist_info.is_master:
                logger.info(f"resumed at update {distiller.state.global_step} from {checkpoint}")
        elif cfg.output.resume == "auto" and dist_info.is_master:
            logger.info(f"--resume auto: no checkpoint in {dump}, starting")
        state = distiller.train()
        if dist_info.is_master:
            atomic_write_json(dump / "train_summary.json", {
                "global_step": state.global_step, "epoch": state.epoch, "best_valid": state.best_valid,
                "nonfinite_skipped": state.nonfinite_skipped,
                "world_size": dist_info.world_size, "rank_param_checksums": distiller.rank_checksums,
                "steps_per_epoch": distiller.steps_per_epoch, "train_seconds": round(distiller.train_seconds, 3),
                "history": state.history, "curvature": curvature_value(distiller.runner)})
            logger.info(f"done: {state.global_step} updates; student saved in {dump}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run(build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    from utils import run_process

    run_process(main)
