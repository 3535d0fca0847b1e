"""`Distiller`: the training loop only (devices, DDP, accumulation, validation, logging, checkpoints, resume,
export), reading a typed `kdcore.config.TrainConfig`. What is computed in a step lives in `kdcore/step_runner.py`
(which passes run, aligned how: `kdcore/alignments.py`) and `custom_step.py` (the losses); precision, the optimizer
and its step and the learning-rate schedule are the trainer core's (`kdcore/trainer_core.py`, shared with GLUE).

Schedule: AdamW; the learning rate is base_lr x warm-up factor (linear over the first `warmup_prop` of the planned
updates, then 1) x plateau factor (`PlateauScaler`: multiplied by `reduce_factor` when the validation loss stops
improving, as torch's ReduceLROnPlateau). Checkpoints hold the full state (model, optimizer, scaler, schedules,
sampler position, counters and every rank's RNG states), are written under a temp name with a checksummed
`manifest.json` last and then renamed, and are verified on load, so `--load_from_checkpoint` / `--resume auto`
continue exactly where a run stopped and never read a half-written or damaged checkpoint.

Non-finite values (`--on_nonfinite`): an update is non-finite when the total loss or a loss term of any of its
micro-batches is NaN/inf on any process, or (fp32/bf16: no GradScaler) the gradient norm after clipping is; with
fp16 the GradScaler alone handles inf/NaN gradients (it skips the step and backs off, the update still counts).
The flags are summed over the processes before anyone decides, so every rank takes the same decision. `stop`
ends the run with a one-line error naming the update, the terms and the last good checkpoint; `skip` drops the
update: its batches are consumed, the gradients zeroed, neither the optimizer nor the learning-rate schedule
steps and `global_step` does not advance (so `max_steps` still counts applied updates, and an epoch applies one
update fewer per skip); skips are counted (`TrainState.nonfinite_skipped`, TensorBoard
`train/nonfinite_skipped`, a warning per skip) and `max_nonfinite_skips` consecutive ones stop the run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from custom_step import mlm_mask
from grouped_batch_sampler import GroupedBatchSampler
from kdcore.alignments import StudentPass
from kdcore.config import TrainConfig
from kdcore.errors import UserError
from kdcore.fsutil import (
    atomic_write_json,
    manifest_problem,
    staged_dir,
    temp_sibling,
    write_manifest,
    writing,
)
from kdcore.model_io import model_card
from kdcore.step_runner import StudentRunner, combine_losses, teacher_forward
from kdcore.teacher_cache import CachedTeacher
from kdcore.trainer_core import (
    LrSchedule,
    PlateauScaler,
    apply_update,
    autocast,
    build_optimizer,
    clip_gradients,
    discard_update,
    grad_scaler,
    store_linears_in,
)
from lm_seqs_dataset import Collator, LmSeqsDataset
from utils import DistInfo, load_optimizer_state, memory_mb, param_digest, rng_state, set_rng_state

CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 3
GRAD_NORM = "gradient norm"
"""How a non-finite gradient norm is named among the NaN/inf parts of an update."""


@dataclass
class TrainState:
    """Counters that a checkpoint restores."""

    global_step: int = 0
    epoch: int = 0
    best_valid: float = math.inf
    bad_validations: int = 0
    last_checkpoint: str | None = None
    history: list = field(default_factory=list)
    nonfinite_skipped: int = 0  # updates dropped by --on_nonfinite skip, over the whole run (0 in older checkpoints)


class Distiller:
    """Runs the training loop of `StudentRunner` (optionally against a teacher) on sharded data."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, runner: StudentRunner, teacher: nn.Module | None,
                 train_data: LmSeqsDataset, valid_data: LmSeqsDataset, collator: Collator,
                 token_probs: torch.Tensor | None, special: dict[str, int], tokenizer, logger, writer=None):
        self.cfg, self.dist, self.logger, self.writer = cfg, dist_info, logger, writer
        self.device = dist_info.device
        self.tokenizer, self.special = tokenizer, special
        self.kl = runner.kl.to(self.device) if runner.kl is not None else None
        runner.kl = self.kl
        self.runner = runner.to(self.device)
        self.hidden = runner.hidden  # hidden_projection.HiddenLosses or None
        positions = [p for p in (self.kl.positions if self.kl else None,
                                 self.hidden.positions if self.hidden else None) if p is not None]
        self.with_t2s = any(p.student_pass is StudentPass.T2S for p in positions)
        self.teacher_reads_student_ids = any(p.teacher_reads_student_ids for p in positions)
        self.epoch_end_hooks: list = []  # callables f(distiller) run after every completed epoch, before validation
        self.step_end_hooks: list = []  # callables f(distiller) run after every applied update, its logs,
        # validation and checkpoint written
        self.model: nn.Module = self.runner
        if dist_info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.runner, device_ids=ids)
        self.teacher = teacher.to(self.device).eval() if teacher is not None else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
        self.train_data, self.valid_data, self.collator = train_data, valid_data, collator
        self.token_probs = token_probs
        opt = cfg.optim
        self.precision = opt.precision
        self.teacher_precision = opt.teacher_autocast
        if self.teacher is not None and (runner.aligner is None or self.teacher_precision == self.precision):
            # an aligner runs parts of the teacher under the student's autocast: only when it is the teacher's
            stored = store_linears_in(self.teacher, self.teacher_precision)
            if stored and dist_info.is_master:
                self.logger.info(f"teacher: {stored:,} Linear weights and biases stored in {self.teacher_precision} "
                                 "once (autocast would cast them at every step; the outputs are identical)")
        self.cache_encoding = collator.cache_encoding  # teacher-cache rows come with the batches (None: online)
        self.scaler = grad_scaler(self.device, opt.precision)
        self.optimizer = build_optimizer(self.runner.named_parameters(), opt.learning_rate, opt.weight_decay,
                                         opt.adam_epsilon, opt.betas, lr_scales={"aligner.": opt.aligner_lr_scale})
        self.sampler = self._sampler(train_data, shuffle_seed=cfg.loop.seed)
        self.steps_per_epoch = len(self.sampler) // opt.gradient_accumulation_steps
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(self.sampler)} batches per epoch are fewer than --gradient_accumulation_steps "
                            f"{opt.gradient_accumulation_steps}; use more data or smaller --batch_size")
        planned = self.steps_per_epoch * cfg.loop.n_epoch
        self.total_steps = min(planned, cfg.loop.max_steps) if cfg.loop.max_steps else planned
        self.plateau = PlateauScaler(opt.learning_rate, factor=opt.reduce_factor)
        self.schedule = LrSchedule(opt.learning_rate, self.total_steps, opt.warmup_prop, plateau=self.plateau)
        self.state = TrainState()
        self.generator = torch.Generator().manual_seed(cfg.loop.seed * 1000 + dist_info.rank)
        self.dump = Path(cfg.output.dump_path)
        self.rank_checksums: list[str] = []
        self.train_seconds = 0.0  # wall time of the last `train` call (its loop, validations and checkpoints)
        self.last_train_losses: dict[str, float] = {}  # the last logged training losses, for the model card
        self.nonfinite_run = 0  # consecutive updates skipped for NaN/inf (--on_nonfinite skip)
        self.command: str | None = None  # the training command line, for the model card
        self._set_lr()

    # ----- data ---------------------------------------------------------------------------------------
    def _sampler(self, data: LmSeqsDataset, shuffle_seed: int) -> GroupedBatchSampler:
        """Batches of this rank's shards: every rank gets the smallest count (so that the processes stay in step),
        rounded down to whole updates (no gradient is carried across epochs)."""
        lengths = np.maximum(data.lengths("teacher"), data.lengths("student"))
        batch_size, by_size = self.cfg.data.batch_size, self.cfg.data.group_by_size
        sampler = GroupedBatchSampler(lengths, batch_size, group_by_size=by_size, seed=shuffle_seed)
        n = torch.tensor(len(sampler), device=self.device)
        if self.dist.distributed:
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
        accum = self.cfg.optim.gradient_accumulation_steps
        return GroupedBatchSampler(lengths, batch_size, group_by_size=by_size, seed=shuffle_seed,
                                   num_batches=int(n.item()) // accum * accum)

    def _batch(self, data: LmSeqsDataset, indices) -> dict[str, torch.Tensor]:
        batch = self.collator(data.gather(indices), with_t2s=self.with_t2s)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _mask(self, batch: dict[str, torch.Tensor], generator: torch.Generator):
        if self.token_probs is None:
            return batch["s_ids"], torch.full_like(batch["s_ids"], -100)
        m = self.cfg.mlm
        return mlm_mask(batch["s_ids"], batch["s_mask"], self.token_probs, m.mask_prop, m.word_mask, m.word_keep,
                        m.word_rand, self.special["mask"], self.token_probs.numel(), generator)

    # ----- one step -----------------------------------------------------------------------------------
    def _teacher(self, batch: dict[str, torch.Tensor], masked: torch.Tensor, labels: torch.Tensor):
        """The teacher's side of the KL and the hidden-state terms: (logits, or the batch's cached rows
        (`CachedTeacher`), or None; hidden states or None). The teacher model runs only for what the cache does not
        serve."""
        cached = None
        if self.cache_encoding is not None and self.kl is not None:
            cached = CachedTeacher(self.cache_encoding, {key.removeprefix("cache."): value
                                                         for key, value in batch.items() if key.startswith("cache.")})
        if self.teacher is None or (self.kl is None and self.hidden is None) or (cached and self.hidden is None):
            return cached, None
        states_read = self.hidden is not None or self.runner.aligner is not None
        logits, states = teacher_forward(self.teacher, batch, None if cached else self.kl, masked, labels,
                                         hidden_states=states_read, reads_student_ids=self.teacher_reads_student_ids)
        return (cached or logits), states

    def _losses(self, batch: dict[str, torch.Tensor], generator: torch.Generator):
        masked, labels = self._mask(batch, generator)
        with autocast(self.device, self.teacher_precision):
            t_logits, t_states = self._teacher(batch, masked, labels)
        with autocast(self.device, self.precision):
            student_out = self.model(batch, masked, labels, t_states)
        if t_logits is not None:
            n_teacher = t_logits.shape[0] if isinstance(t_logits, torch.Tensor) else t_logits.n_rows
            if n_teacher != student_out["kl_student"].shape[0]:
                raise UserError(f"{n_teacher} teacher rows but {student_out['kl_student'].shape[0]} student rows are "
                                "aligned in a batch: the match masks of the shards (or the teacher cache) are "
                                "inconsistent; re-run find_matching_ids.py (or cache_teacher.py)")
        return combine_losses(student_out, t_logits, self.kl, self.cfg.losses.weights)

    def _set_lr(self) -> float:
        return self.schedule.apply(self.optimizer, self.state.global_step)

    def _clip(self) -> torch.Tensor:
        """Unscale (fp16) and clip the accumulated gradients; their norm before clipping (0-dim tensor)."""
        return clip_gradients(self.optimizer, self.scaler, self.runner.parameters(), self.cfg.optim.max_grad_norm)

    def _apply_update(self) -> None:
        apply_update(self.optimizer, self.scaler)
        self.state.global_step += 1
        self._set_lr()

    def _nonfinite_terms(self, flags: torch.Tensor, names: list[str], grad_norm: torch.Tensor) -> list[str]:
        """The non-finite parts of this update on any process. flags [len(names)]: per loss name, the count of this
        process's micro-batches where it was NaN/inf; `grad_norm` is checked only without a GradScaler (fp32, bf16).
        One all_reduce, so that every rank decides alike. Named: the NaN/inf loss terms, else the total `loss`
        (when only the sum overflowed), else the "gradient norm" (a NaN/inf loss makes the gradients NaN too)."""
        grad_flag = (~torch.isfinite(grad_norm)).to(flags) if not self.scaler.is_enabled() else flags.new_zeros(())
        flags = torch.cat([flags, grad_flag.reshape(1)])
        if self.dist.distributed:
            dist.all_reduce(flags)
        bad = [name for name, n in zip([*names, GRAD_NORM], flags.tolist()) if n > 0]
        return [n for n in bad if n not in ("loss", GRAD_NORM)] or [n for n in bad if n == "loss"] or bad

    def _on_nonfinite(self, terms: list[str]) -> None:
        """Apply --on_nonfinite to an update whose `terms` were NaN/inf: raise (stop, or too many consecutive
        skips) or drop the update and count it."""
        loop, update = self.cfg.loop, self.state.global_step + 1
        what = ", ".join(terms)
        if loop.on_nonfinite == "stop":
            self._fail_nonfinite(f"NaN/inf in {what} at update {update}")
        discard_update(self.optimizer, self.scaler)
        self.nonfinite_run += 1
        self.state.nonfinite_skipped += 1
        if self.dist.is_master:
            self.logger.warning(f"update {update}: NaN/inf in {what}; update skipped ({self.nonfinite_run} in a row, "
                                f"{self.state.nonfinite_skipped} in the run)")
            if self.writer is not None:
                self.writer.add_scalar("train/nonfinite_skipped", self.state.nonfinite_skipped, self.state.global_step)
        if self.nonfinite_run >= loop.max_nonfinite_skips:
            self._fail_nonfinite(f"{self.nonfinite_run} consecutive updates skipped (--max_nonfinite_skips "
                                 f"{loop.max_nonfinite_skips}), the last for NaN/inf in {what} at update {update}")

    # ----- loop ---------------------------------------------------------------------------------------
    def train(self) -> TrainState:
        """Train until n_epoch epochs, max_steps updates or the validation patience runs out."""
        out, accum = self.cfg.output, self.cfg.optim.gradient_accumulation_steps
        started = time.perf_counter()
        progress = self._progress()
        sums: dict[str, float] = {}
        tokens, t_last, stop = 0, time.perf_counter(), self._finished()
        while self.state.epoch < self.cfg.loop.n_epoch and not stop:
            if self.sampler.state_dict()["batches_done"] == 0:
                self.sampler.set_epoch(self.state.epoch)
            micro, update_sums, flags = 0, {}, None
            self.runner.train()
            for indices in self.sampler:
                batch = self._batch(self.train_data, indices)
                micro += 1
                sync = micro % accum == 0
                ctx = self.model.no_sync() if self.dist.distributed and not sync else nullcontext()
                with ctx:
                    total, losses = self._losses(batch, self.generator)
                    self.scaler.scale(total / accum).backward()
                values = {"loss": total.detach(), **{k: v.detach() for k, v in losses.items()}}
                finite = torch.stack([torch.isfinite(v).all() for v in values.values()])
                flags = (~finite).float() + (flags if flags is not None else 0)
                for name, value in values.items():
                    update_sums[name] = update_sums.get(name, 0.0) + float(value) / accum
                tokens += int(batch["s_mask"].sum())
                if not sync:
                    continue
                norm = self._clip()
                terms = self._nonfinite_terms(flags, list(values), norm)
                flags = None
                if terms:
                    self._on_nonfinite(terms)
                    update_sums = {}
                    continue
                self._apply_update()
                self.nonfinite_run = 0
                grad_norm = float(norm)
                for name, value in update_sums.items():
                    sums[name] = sums.get(name, 0.0) + value
                update_sums = {}
                step = self.state.global_step
                if progress is not None:
                    progress.update(1)
                if step % out.log_interval == 0:
                    elapsed = time.perf_counter() - t_last
                    self._log_train(sums, out.log_interval, grad_norm, tokens / max(elapsed, 1e-9))
                    sums, tokens, t_last = {}, 0, time.perf_counter()
                if step % out.checkpoint_interval == 0 or step == self.total_steps:
                    stop = self._validate_and_save()
                for hook in self.step_end_hooks:
                    hook(self)
                if step >= self.total_steps or stop:
                    stop = True
                    break
            if not stop:
                self.state.epoch += 1
                self.sampler.set_epoch(self.state.epoch)
                for hook in self.epoch_end_hooks:
                    hook(self)
                if self.state.global_step % out.checkpoint_interval != 0:
                    stop = self._validate_and_save()
        if progress is not None:
            progress.close()
        self.train_seconds = time.perf_counter() - started
        self.rank_checksums = self._gather(param_digest(self.runner))
        if self.dist.is_master:
            if len(set(self.rank_checksums)) > 1:
                self.logger.warning("the processes ended with different weights: gradient synchronisation failed")
            self.export(self.dump)
        return self.state

    def _finished(self) -> bool:
        """True when the state (a resumed checkpoint's) already ended training: max_steps reached or the
        validation patience spent. A run killed after its last checkpoint then only exports again."""
        patience = self.cfg.loop.valid_epochs_patience
        return self.state.global_step >= self.total_steps or bool(patience and self.state.bad_validations >= patience)

    def _fail_nonfinite(self, what: str) -> None:
        """Stop the run (every rank raises alike): `what` happened; name the last good checkpoint."""
        raise UserError(f"{what}; training stopped. The last good checkpoint is "
                        f"{self.state.last_checkpoint or '(none yet)'}; lower --learning_rate, raise --warmup_prop or "
                        "use --precision fp32, then resume with --load_from_checkpoint (or pass --on_nonfinite skip)")

    def _progress(self):
        if not self.dist.is_master:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.state.global_step, desc="distil", unit="step",
                    dynamic_ncols=True, disable=os.environ.get("RVKD_NO_TQDM") == "1")

    # ----- validation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        """Mean total loss over this process's validation data (averaged over ranks), in eval mode, with fixed
        seeds for the masking and the contrastive negatives, so that validations are comparable and draw nothing
        from the training RNG."""
        self.runner.eval()
        negatives = torch.Generator(device=self.device).manual_seed(self.cfg.loop.seed + 104729 * (self.dist.rank + 1))
        with self.hidden.seeded_negatives(negatives) if self.hidden is not None else nullcontext():
            return self._validate()

    def _validate(self) -> float:
        generator = torch.Generator().manual_seed(self.cfg.loop.seed + 7919 * (self.dist.rank + 1))
        lengths = np.maximum(self.valid_data.lengths("teacher"), self.valid_data.lengths("student"))
        order = np.argsort(lengths, kind="stable")
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        batch_size = self.cfg.data.batch_size
        for start in range(0, len(order), batch_size):
            batch = self._batch(self.valid_data, order[start:start + batch_size])
            masked, labels = self._mask(batch, generator)
            with autocast(self.device, self.teacher_precision):
                t_logits, t_states = self._teacher(batch, masked, labels)
            with autocast(self.device, self.precision):
                out = self.runner(batch, masked, labels, t_states)
            total, _ = combine_losses(out, t_logits, self.kl, self.cfg.losses.weights)
            sums += torch.tensor([float(total), 1.0], dtype=torch.float64, device=self.device)
        if self.dist.distributed:
            dist.all_reduce(sums)
        self.runner.train()
        return float(sums[0] / sums[1]) if sums[1] > 0 else math.nan

    def _validate_and_save(self) -> bool:
        """Validate, update the plateau schedule, best model and patience, checkpoint; True = stop.
        Without validation data (`--valid_prop 0`) only the checkpoint is written."""
        if len(self.valid_data) == 0:
            if self.dist.is_master:
                self.logger.info(f"step {self.state.global_step}: no validation data (--valid_prop 0): checkpoint only")
            self.save_checkpoint()
            return False
        value = self.validate()
        step = self.state.global_step
        reduced = self.schedule.on_validation(value)
        self._set_lr()
        improved = value < self.state.best_valid
        if improved:
            self.state.best_valid, self.state.bad_validations = value, 0
        else:
            self.state.bad_validations += 1
        self.state.history.append({"step": step, "epoch": self.state.epoch, "valid_loss": value,
                                   "lr_scale": self.plateau.scale})
        if self.dist.is_master:
            self.logger.info(f"step {step}: valid loss {value:.5f}{' (best)' if improved else ''}"
                             f"{'; learning rate reduced' if reduced else ''}")
            if self.writer is not None:
                self.writer.add_scalar("valid/loss", value, step)
            if improved:
                self.export(self.dump / "best")
        self.save_checkpoint()
        patience = self.cfg.loop.valid_epochs_patience
        if patience and self.state.bad_validations >= patience:
            if self.dist.is_master:
                self.logger.info(f"no validation improvement for {patience} validations: stopping")
            return True
        return False

    # ----- logging ------------------------------------------------------------------------------------
    def _log_train(self, sums: dict[str, float], n_steps: int, grad_norm: float, tokens_per_s: float) -> None:
        world = self.dist.world_size
        scalars = {f"train/{k}": v / n_steps for k, v in sums.items()}
        scalars.update({"train/lr": self.optimizer.param_groups[0]["lr"], "train/grad_norm": grad_norm,
                        "train/nonfinite_skipped": self.state.nonfinite_skipped,
                        "train/tokens_per_s": tokens_per_s * world,
                        **{f"memory/{k}": v for k, v in memory_mb(self.device).items()}})
        self.last_train_losses = {k.split("/")[1]: v for k, v in scalars.items() if k.startswith("train/loss")}
        if self.dist.is_master:
            step = self.state.global_step
            if self.writer is not None:
                for name, value in scalars.items():
                    self.writer.add_scalar(name, value, step)
                self.writer.flush()
            self.logger.info(f"step {step}: " + " ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in scalars.items()))

    # ----- checkpoints --------------------------------------------------------------------------------
    def _gather(self, obj):
        if not self.dist.distributed:
            return [obj]
        out = [None] * self.dist.world_size
        dist.all_gather_object(out, obj)
        return out

    def save_checkpoint(self) -> Path:
        """Write the full training state to dump_path/checkpoints/<step>/ atomically (rank 0 writes)."""
        rngs = self._gather(rng_state())
        generators = self._gather(self.generator.get_state())
        final = self.dump / CHECKPOINTS / str(self.state.global_step)
        if self.dist.is_master:
            previous = self.state.last_checkpoint
            fix = (f"free disk space, then relaunch the same command with --resume auto (the last complete checkpoint "
                   f"is {previous or '(none yet)'})")
            with writing(final, "checkpoint", fix), staged_dir(final) as tmp:
                save_model(self.runner, str(tmp / "model.safetensors"))
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                self.state.last_checkpoint = str(final)
                torch.save({"sampler": self.sampler.state_dict(), "plateau": self.plateau.state_dict(),
                            "grad_scaler": self.scaler.state_dict(), "rng": rngs, "mlm_generator": generators,
                            "state": json.dumps(vars(self.state)), "world_size": self.dist.world_size},
                           tmp / "trainer_state.pt")
                atomic_write_json(tmp / "state.json", {**vars(self.state), "world_size": self.dist.world_size})
                write_manifest(tmp, {"global_step": self.state.global_step})
            for old in sorted((p for p in final.parent.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))[
                    :-KEEP_CHECKPOINTS]:
                shutil.rmtree(old)
        else:
            self.state.last_checkpoint = str(final)
        if self.dist.distributed:
            dist.barrier()
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything `save_checkpoint` wrote into the checkpoint `path` (verified against its manifest by
        `resolve_checkpoint` or `newest_checkpoint`); the run continues exactly where it stopped."""
        try:
            load_model(self.runner, str(path / "model.safetensors"), device=str(self.device))
            load_optimizer_state(self.optimizer, torch.load(path / "optimizer.pt", map_location=self.device,
                                                            weights_only=True))
            blob = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, KeyError, ValueError, SafetensorError) as err:
            raise UserError(f"cannot resume from checkpoint {path}: {str(err).splitlines()[0]}; pass a complete "
                            "checkpoint directory (dump_path/checkpoints/<step>)") from err
        if blob["world_size"] != self.dist.world_size:
            raise UserError(f"checkpoint {path} was written by {blob['world_size']} processes, this run has "
                            f"{self.dist.world_size}; resume with the same number of processes")
        self.sampler.load_state_dict(blob["sampler"])
        self.plateau.load_state_dict(blob["plateau"])
        self.scaler.load_state_dict(blob["grad_scaler"])
        set_rng_state(blob["rng"][self.dist.rank])
        self.generator.set_state(blob["mlm_generator"][self.dist.rank])
        self.state = TrainState(**json.loads(blob["state"]))
        self._set_lr()

    def _card_facts(self) -> dict:
        """What the model card of an export says (see `model_io.model_card`)."""
        student = self.runner.student
        return {"teacher": self.cfg.data.teacher_name, "alignment": self.kl.describe() if self.kl else None,
                "losses": self.cfg.losses.weights, "temperature": self.cfg.losses.temperature,
                "train_sequences": len(self.train_data) * self.dist.world_size, "updates": self.state.global_step,
                "final_train": self.last_train_losses, "best_valid": None if math.isinf(self.state.best_valid)
                else self.state.best_valid, "parameters": sum(p.numel() for p in student.parameters()),
                "vocab_size": student.config.vocab_size, "model_type": student.config.model_type,
                "command": self.command}

    def export(self, directory: Path) -> None:
        """Save the student as an HF model directory (config, safetensors, tokenizer files, vocab.txt, and a model
        card README.md), file by file under temp names."""
        fix = "free disk space, then relaunch the same command with --resume auto (it exports again)"
        with writing(directory, "the student export", fix):
            self._export(directory)

    def _export(self, directory: Path) -> None:
        from kdcore.tokenizer_utils import write_vocab_txt

        directory.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(directory / ".export")
        try:
            self.runner.student.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            write_vocab_txt(self.tokenizer, tmp)
            (tmp / "README.md").write_text(model_card(self._card_facts()), encoding="utf-8")
            for item in tmp.iterdir():
                os.replace(item, directory / item.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def newest_checkpoint(dump: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint of `dump` whose manifest verifies, or None; "path: problem" of each newer one that
    does not)."""
    root = Path(dump) / CHECKPOINTS
    steps = sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)) if root.is_dir() else []
    skipped = []
    for path in reversed(steps):
        problem = manifest_problem(path)
        if problem is None:
            return path, skipped
        skipped.append(f"{path}: {problem}")
    return None, skipped


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory (verified against its manifest), or the newest complete checkpoint of a dump_path."""
    path = Path(path)
    if (path / "trainer_state.pt").is_file():
        problem = manifest_problem(path)
        if problem is not None:
            raise UserError(f"cannot resume from checkpoint {path}: damaged or incomplete ({problem}); resume from an "
                            f"earlier checkpoint in {path.parent}, or pass the dump_path to take the newest complete one")
        return path
    found, skipped = newest_checkpoint(path)
    if found is None:
        raise UserError(f"--load_from_checkpoint {path} is neither a checkpoint (no trainer_state.pt) nor a dump_path "
                        f"with a complete checkpoint{' (' + '; '.join(skipped) + ')' if skipped else ''}; pass "
                        "dump_path/checkpoints/<step>")
    return found
