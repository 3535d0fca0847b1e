"""Command line of `distil-finetuned-en/train.py`: fine-tune a model on a GLUE task (`train_single`) or distil
a fine-tuned teacher into a student (`distil_teacher`), offline, from the GLUE TSV folders on disk.

    python distil-finetuned-en/train.py --glue_dataset TASK --glue_dir DIR --tokenizer_name TOK \\
        --dumps_dir OUT [common flags] train_single --model_name M [--from_pretrained] ...
    python distil-finetuned-en/train.py ... distil_teacher --teacher_name T --student_name S \\
        [--student_weights W] --alpha_kl A --temperature T [...] [hyperbolic ...]

Output in --dumps_dir: results.json, best_model/ (HF directory + tokenizer), tensorboard/, train.log.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from glue_args import build_parser, validate_args
from glue_tasks import TASKS, TaskSpec

from kdcore.errors import UserError
from kdcore.fsutil import atomic_write_json


def _inputs(a: argparse.Namespace) -> list[str]:
    names = ["glue_dir", "tokenizer_name", "tokenizer_params", "model_name", "teacher_name", "teacher_weights",
             "student_name", "student_weights"]
    return [getattr(a, name) for name in names if getattr(a, name, None)]


def prepare_dumps_dir(a: argparse.Namespace) -> Path:
    """Create --dumps_dir; with --force empty it first (refused when an input lies inside it)."""
    dump = Path(a.dumps_dir).resolve()
    if a.force and dump.exists():
        for path in _inputs(a):
            if Path(path).resolve().is_relative_to(dump):
                raise UserError(f"--force would delete {path}, which lies inside --dumps_dir {dump}; choose another "
                                "--dumps_dir")
        shutil.rmtree(dump)
    dump.mkdir(parents=True, exist_ok=True)
    return dump


def _load_models(a: argparse.Namespace, data, logger):
    """(model to train, teacher or None)."""
    from glue_models import load_classifier

    head = (data.num_labels, data.label_names, data.spec.regression)
    if a.command == "train_single":
        model = load_classifier(a.model_name, *head, weights=a.model_name if a.from_pretrained else None,
                                role="model", logger=logger)
        return model, None
    teacher = load_classifier(a.teacher_name, *head, weights=a.teacher_weights or a.teacher_name, role="teacher",
                              logger=logger, trained_head=True)
    student = load_classifier(a.student_name, *head, weights=a.student_weights, role="student", logger=logger)
    return student, teacher


def _fit_lengths(a: argparse.Namespace, params, tokenizer, model, teacher) -> None:
    """Check that the tokenizer is the models' own (where their directories hold one), resolve the default
    max_length (128, or the models' position count when smaller) and check that ids and max_length fit."""
    from glue_data import DEFAULT_MAX_LENGTH
    from glue_models import check_model, check_tokenizer

    models = [("model", model, a.model_name)] if teacher is None else [
        ("teacher", teacher, a.teacher_name), ("student", model, a.student_name)]
    dirs = [("model", a.model_name)] if teacher is None else [
        ("teacher", a.teacher_name), ("teacher", a.teacher_weights), ("student", a.student_name),
        ("student", a.student_weights)]
    for role, path in dirs:
        check_tokenizer(tokenizer, path, role)
    if params.max_length is None:
        positions = [getattr(m.config, "max_position_embeddings", None) for _, m, _ in models]
        params.max_length = min([DEFAULT_MAX_LENGTH, *[p for p in positions if p]])
    for role, m, path in models:
        check_model(m, tokenizer, params.max_length, role, path)


def _train_config(a: argparse.Namespace):
    from glue_trainer import TrainConfig

    single = a.command == "train_single"
    return TrainConfig(
        lr=a.lr, weight_decay=a.weight_decay, adam_epsilon=a.adam_epsilon, batch_size=a.batch_size,
        eval_batch_size=a.eval_batch_size or 2 * a.batch_size, gradient_accumulation_steps=a.gradient_accumulation_steps,
        n_epochs=a.n_epochs, max_steps=a.max_steps, max_grad_norm=a.max_grad_norm,
        log_after_n_steps=a.log_after_n_steps, log_after_epoch=a.log_after_epoch, valid_patience=a.valid_patience,
        schedule="plateau" if single else "linear", warmup_prop=a.warmup_prop,
        lr_drop_patience=a.lr_drop_patience if single else 0, lr_drop_div=a.lr_drop_div if single else 1.5,
        min_lr=a.min_lr if single else 0.0, precision=a.precision, seed=a.seed)


class _Recorder(logging.Handler):
    """Keeps the records logged before the log file exists, to write them there later."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def replay(self, logger: logging.Logger) -> None:
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler):
                for record in self.records:
                    handler.handle(record)


def _train_subset(train_set, n: int, seed: int):
    """A fixed random subset of `n` training examples (all of them when n is 0 or larger than the set)."""
    import numpy as np
    import torch

    if n <= 0 or n >= len(train_set):
        return train_set
    idx = np.sort(np.random.default_rng(seed).choice(len(train_set), size=n, replace=False))
    return torch.utils.data.Subset(train_set, idx.tolist())


@dataclass
class Job:
    """Everything a run needs, loaded and checked before --dumps_dir is touched."""

    spec: TaskSpec
    data: object
    tokenizer: object
    params: object
    model: object
    teacher: object
    objective: object
    train_set: object
    dev_sets: dict
    collator: object
    device: object


def prepare(a: argparse.Namespace, logger: logging.Logger) -> Job:
    """Read the data, the tokenizer and the models, check them against each other, tokenise."""
    from glue_data import Collator, encode, load_task, load_tokenizer_params
    from glue_objective import Objective
    from hidden_terms import build_hidden_terms

    from kdcore.tokenizer_utils import load_tokenizer
    from utils import choose_device, set_seed

    spec = TASKS[a.glue_dataset]
    device = choose_device(a.device)
    set_seed(a.seed)
    data = load_task(spec, a.glue_dir, a.bad_rows, a.num_labels)
    for split in (data.train, *data.dev.values()):
        if split.skipped_lines:
            logger.warning(f"{split.path}: skipped {len(split.skipped_lines)} malformed rows (lines "
                           f"{split.skipped_lines[:5]}{' ...' if len(split.skipped_lines) > 5 else ''})")
    params = load_tokenizer_params(a.tokenizer_params)
    tokenizer = load_tokenizer(a.tokenizer_name, "tokenizer")
    if tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer in {a.tokenizer_name} has no padding token; add [PAD] to it")
    model, teacher = _load_models(a, data, logger)
    _fit_lengths(a, params, tokenizer, model, teacher)
    hidden = build_hidden_terms(a, teacher.config, model.config, len(data.train)) if teacher is not None else None
    objective = Objective(spec, a.alpha_task, getattr(a, "alpha_kl", 0.0), getattr(a, "temperature", 1.0),
                          getattr(a, "train_temperature", False), hidden)
    train_set = encode(data.train, tokenizer, params, spec.regression)
    dev_sets = {name: encode(split, tokenizer, params, spec.regression) for name, split in data.dev.items()}
    collator = Collator(tokenizer.pad_token_id, params.max_length if params.padding == "max_length" else None)
    return Job(spec, data, tokenizer, params, model, teacher, objective, train_set, dev_sets, collator, device)


def train_and_report(a: argparse.Namespace, job: Job, dump: Path, logger: logging.Logger, writer) -> dict:
    """Train (the best model goes to dump/best_model) and return the content of results.json."""
    from glue_models import save_model_dir
    from glue_trainer import GlueTrainer, evaluate

    from utils import git_info

    spec, model, device, cfg = job.spec, job.model, job.device, _train_config(a)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"{a.command} on {spec.name}: {len(job.train_set)} train / "
                f"{', '.join(f'{len(v)} {k}' for k, v in job.dev_sets.items())} examples, {job.data.num_labels} "
                f"label(s), model {n_params:,} parameters, device {device}")

    def score(m, data) -> dict[str, float]:
        return evaluate(spec, m, data, job.collator, cfg.eval_batch_size, device, a.precision)

    results: dict = {"task": spec.name}
    if job.teacher is not None:
        results["teacher"] = {name: score(job.teacher.to(device), split) for name, split in job.dev_sets.items()}
        for split, values in results["teacher"].items():
            for name, value in values.items():
                writer.add_scalar(f"teacher/{split}/{name}", value, 0)
        logger.info(f"teacher: {results['teacher']}")
    hidden = job.objective.hidden
    hyperbolic = hidden is not None and hidden.losses.hyperbolic is not None
    dev = job.dev_sets[spec.primary_dev]

    def curvature(epoch: int) -> float:
        from hidden_terms import estimate_curvature

        return estimate_curvature(a, hidden, job.teacher.to(device), model.to(device), dev, job.collator, device,
                                  logger, epoch)

    if hyperbolic and a.init_c:
        results["initial_curvature"] = curvature(0)
    recompute = hyperbolic and a.adjust_c == "recompute_after_epoch"
    best_dir = dump / "best_model"
    trainer = GlueTrainer(spec, model, job.objective, job.train_set, job.dev_sets, job.collator, cfg, device, logger,
                          writer, on_best=lambda m: save_model_dir(m, job.tokenizer, best_dir), teacher=job.teacher,
                          on_epoch_end=curvature if recompute else None)
    outcome = trainer.train()
    train_eval = _train_subset(job.train_set, a.train_eval_examples, a.seed)
    results["train"] = score(model, train_eval)
    results.update(outcome.best_metrics)
    learned = {"learned_temperature": float(job.objective.temperature.detach())} if getattr(
        a, "train_temperature", False) else {}
    if job.objective.curvature() is not None:
        learned["curvature"] = job.objective.curvature()
    splits = (job.data.train, *job.data.dev.values())
    results.update({
        "best_step": outcome.best_step, "best_epoch": outcome.best_epoch + 1, "global_step": outcome.global_step,
        "selection": {"split": spec.primary_dev, "metrics": list(spec.selection), "score": outcome.best_score},
        "stopped_early": outcome.stopped_early,
        "data": {"num_labels": job.data.num_labels, "label_names": job.data.label_names,
                 "n_train": len(job.train_set), "n_train_eval": len(train_eval),
                 **{f"n_{k}": len(v) for k, v in job.dev_sets.items()},
                 "skipped_rows": {str(s.path): len(s.skipped_lines) for s in splits if s.skipped_lines}},
        "model": {"n_parameters": n_params, "model_type": model.config.model_type, **learned},
        "params": {**vars(a), "tokenizer_params": asdict(job.params), "device": str(device),
                   "git": git_info(Path(__file__).parent)},
        "history": outcome.history,
    })
    shown = {k: results[k] for k in ("train", *job.dev_sets)}
    logger.info(f"done: best update {outcome.best_step}, {shown}; model in {best_dir}")
    return results


def run(a: argparse.Namespace) -> int:
    """Fine-tune or distil, then write results.json; returns 0."""
    validate_args(a)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from setup_logger import setup_logger

    logger = setup_logger("glue")
    early = _Recorder()
    logger.addHandler(early)  # what is logged before --dumps_dir exists goes to train.log too
    job = prepare(a, logger)
    dump = prepare_dumps_dir(a)
    logger = setup_logger("glue", dump / "train.log")
    early.replay(logger)
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir=str(dump / "tensorboard"))
    try:
        atomic_write_json(dump / "results.json", train_and_report(a, job, dump, logger, writer))
    finally:
        writer.close()
        setup_logger("glue")  # closes train.log
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
