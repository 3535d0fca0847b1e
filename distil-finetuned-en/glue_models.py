"""Sequence-classification models for the GLUE tasks: building them from a config or loading weights
(an HF directory or a state-dict file), checking them against the tokenizer, running them, saving them.

A model directory is any HF directory with a `config.json` (BERT, DistilBERT, ...). The task decides the
head: `num_labels` (1 for STS-B regression), `id2label`/`label2id` and `problem_type` are written into the
config, so the saved model opens with `AutoModelForSequenceClassification.from_pretrained` and knows its
labels. Loading weights into a classifier may leave only the task head (classifier, pooler,
pre_classifier) newly initialised, e.g. from a pretrained masked-LM checkpoint; any other missing weight
is an error.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from pathlib import Path

import torch
from torch import nn

from kdcore.errors import UserError
from kdcore.fsutil import staged_dir

HEAD_MARKERS = ("classifier", "pooler")
"""Parameters whose names contain these belong to the task head and may be initialised fresh."""


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _is_head(key: str) -> bool:
    return any(marker in key for marker in HEAD_MARKERS)


def task_config(path: str | Path, num_labels: int, label_names: list[str], regression: bool, role: str):
    """The AutoConfig of `path` set up for the task's head."""
    _quiet()
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{role} directory {path} has no config.json; pass an HF model directory")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the {role} config {path / 'config.json'}: {str(err).splitlines()[0]}") from None
    config.id2label = {i: name for i, name in enumerate(label_names)}
    config.label2id = {name: i for i, name in enumerate(label_names)}
    config.num_labels = num_labels
    config.problem_type = "regression" if regression else "single_label_classification"
    return config


def _check_keys(missing, mismatched, source, role: str) -> list[str]:
    """Raise when weights other than the head are missing or mis-shaped; return the fresh head keys."""
    missing = [k for k in missing if "position_ids" not in k]
    body = [k for k in [*missing, *mismatched] if not _is_head(k)]
    if body:
        raise UserError(f"{role} weights {source} do not fit its config (missing or mis-shaped: {sorted(body)[:3]}); "
                        "pass weights saved from this architecture")
    return sorted([*missing, *mismatched])


def load_classifier(config_dir: str | Path, num_labels: int, label_names: list[str], regression: bool, *,
                    weights: str | Path | None, role: str, logger: logging.Logger | None = None,
                    trained_head: bool = False) -> nn.Module:
    """An AutoModelForSequenceClassification with `config_dir`'s architecture; weights from `weights` (an
    HF directory or a .safetensors / torch state-dict file) or random when None. With `trained_head` (a
    teacher) the weights must include a head for this task: none of it may be initialised fresh."""
    from transformers import AutoModelForSequenceClassification

    config = task_config(config_dir, num_labels, label_names, regression, role)
    if weights is None:
        return AutoModelForSequenceClassification.from_config(config)
    weights = Path(weights)
    if weights.is_dir():
        from kdcore.model_io import check_model_files

        check_model_files(weights, role, f"save the {role} again with save_pretrained() (or copy it again)")
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(weights), config=config, output_loading_info=True, ignore_mismatched_sizes=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise UserError(f"cannot load {role} weights from {weights}: {str(err).splitlines()[0]}") from None
        fresh = _check_keys(info["missing_keys"], [k for k, *_ in info["mismatched_keys"]], weights, role)
    elif weights.is_file():
        from kdcore.model_io import load_state_dict_file

        model = AutoModelForSequenceClassification.from_config(config)
        state = load_state_dict_file(weights)
        own = model.state_dict()
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        state = {k: v for k, v in state.items() if k not in mismatched}
        missing, _ = model.load_state_dict(state, strict=False)
        fresh = _check_keys(missing, mismatched, weights, role)
    else:
        raise UserError(f"{role} weights {weights} do not exist; pass an HF model directory or a state-dict file")
    if fresh and trained_head:
        raise UserError(f"{role} weights {weights} have no trained classifier for {num_labels} label(s) (fresh: "
                        f"{fresh[:3]}); pass a model fine-tuned on this task (train_single's best_model)")
    if fresh and logger is not None:
        logger.info(f"{role}: task head initialised fresh ({', '.join(fresh)})")
    return model


def check_tokenizer(tokenizer, model_dir: str | Path | None, role: str,
                    logger: logging.Logger | None = None) -> None:
    """A model directory that holds its own tokenizer must encode text exactly as --tokenizer_name does
    (same vocabulary, normalisation and pre-tokenisation): teacher and student share one tokenizer here."""
    from kdcore.tokenizer_utils import TOKENIZER_FILES, fingerprint, load_tokenizer

    path = Path(model_dir) if model_dir else None
    if path is None or not path.is_dir() or not any((path / name).is_file() for name in TOKENIZER_FILES):
        return
    try:
        own = load_tokenizer(path, role)
    except UserError as err:
        if logger is not None:
            logger.warning(f"cannot compare the tokenizer in {path} with --tokenizer_name ({err})")
        return
    if fingerprint(own) != fingerprint(tokenizer):
        raise UserError(f"the {role} directory {path} holds a different tokenizer than --tokenizer_name "
                        f"{tokenizer.name_or_path}; pass the tokenizer the {role} was trained with")


def check_model(model: nn.Module, tokenizer, max_length: int, role: str, path: str | Path) -> None:
    """The tokenizer's ids and `max_length` positions must fit the model."""
    config = model.config
    if config.vocab_size < len(tokenizer):
        raise UserError(f"{role} {path} has vocab_size {config.vocab_size} but the tokenizer has {len(tokenizer)} "
                        "tokens; use the tokenizer the model was trained with (or fix vocab_size in config.json)")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise UserError(f"--tokenizer_params max_length {max_length} exceeds the {role}'s max_position_embeddings "
                        f"{positions} ({path}); lower max_length")


@functools.cache
def _forward_takes_token_types(model_class: type) -> bool:
    return "token_type_ids" in inspect.signature(model_class.forward).parameters


def accepts_token_type_ids(model: nn.Module) -> bool:
    """BERT reads segment ids; DistilBERT has none."""
    return _forward_takes_token_types(type(model))


def run_model(model: nn.Module, batch: dict[str, torch.Tensor], hidden_states: bool = False):
    """Forward a batch (labels excluded: the losses are ours); returns the HF output (logits [B, C],
    hidden_states when asked)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if accepts_token_type_ids(model):
        inputs["token_type_ids"] = batch["token_type_ids"]
    return model(**inputs, output_hidden_states=hidden_states, return_dict=True)


def save_model_dir(model: nn.Module, tokenizer, directory: str | Path) -> None:
    """Write config, safetensors weights and tokenizer files atomically (a temp directory renamed)."""
    with staged_dir(directory) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
