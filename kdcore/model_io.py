"""Loading teachers and students (HF directories or state-dict files) with one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

from kdcore.errors import UserError


def _quiet_transformers() -> None:
    """Offline mode and no per-load progress bars (our logs and tqdm bars say what happens)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


SAVE_TEACHER = "save the teacher again with BertForMaskedLM.save_pretrained() (or copy it again)"


def check_model_files(path: str | os.PathLike, role: str, fix: str) -> dict:
    """Check an HF model directory without loading its weights: `config.json` is JSON and every `.safetensors` file
    is complete (its header and the data it announces fit the file). Returns the parsed config. One-line errors name
    the file and end with `fix`."""
    from safetensors import SafetensorError, safe_open

    from kdcore.artifacts import load_json

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{role} directory {path} does not exist; {fix}")
    config = load_json(path / "config.json", f"{role} config", fix)
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise UserError(f"{role} weights {weights} are truncated or not a safetensors file "
                            f"({str(err).splitlines()[0]}); {fix}") from err
    return config


def check_teacher(path: str | os.PathLike, tokenizer_size: int) -> None:
    """What a teacher directory must hold before any work starts: readable config and weights (`check_model_files`)
    of a BERT whose embedding matrix has one row per token of its tokenizer (`tokenizer_size`)."""
    config = check_model_files(path, "teacher", SAVE_TEACHER)
    if config.get("model_type") != "bert":
        raise UserError(f"teacher {path} is a {config.get('model_type')!r} model (config.json); pass a "
                        "BertForMaskedLM directory")
    check_vocab_fits(path, config.get("vocab_size"), tokenizer_size)


def check_vocab_fits(path: str | os.PathLike, vocab_size: int | None, tokenizer_size: int) -> None:
    """The teacher's embeddings (`vocab_size` rows) and its tokenizer (`tokenizer_size` tokens) must match."""
    if vocab_size != tokenizer_size:
        raise UserError(f"teacher {path} has {vocab_size} embedding rows (config.json vocab_size) but its tokenizer "
                        f"has {tokenizer_size} tokens: the model and tokenizer do not belong together; put the "
                        "tokenizer the teacher was trained with in that directory")


def load_teacher(path: str | os.PathLike):
    """A BertForMaskedLM with its MLM head; a one-line error when the directory lacks weights or the head."""
    _quiet_transformers()
    from transformers import AutoModelForMaskedLM

    check_model_files(path, "teacher", SAVE_TEACHER)
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(str(path), output_loading_info=True)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the teacher model from {path}: {str(err).splitlines()[0]}; pass a "
                        "BertForMaskedLM directory (config.json + weights)") from err
    missing = [k for k in info["missing_keys"] if "predictions" in k or "embeddings" in k]
    if model.config.model_type != "bert" or missing:
        raise UserError(f"teacher {path} is not a BertForMaskedLM with an MLM head (missing: {missing[:3]}); "
                        "save the teacher with its MLM head (BertForMaskedLM.save_pretrained)")
    return model


def load_state_dict_file(path: Path) -> dict:
    """Weights from a .safetensors file or a torch file (loaded with weights_only=True: no pickled code)."""
    import torch
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or foreign file: name it and stop
        raise UserError(f"cannot read weights from {path}: {str(err).splitlines()[0]}; pass an HF model directory, "
                        "a .safetensors file or a plain state-dict file") from err


def load_student(config_dir: str | os.PathLike, weights: str | os.PathLike | None = None,
                 attn_implementation: str | None = None):
    """An AutoModelForMaskedLM built from `config_dir/config.json`, initialised from `weights` (an HF
    directory or a state-dict file) or randomly when `weights` is None."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModelForMaskedLM

    config_path = Path(config_dir) / "config.json"
    if not config_path.is_file():
        raise UserError(f"student directory {config_dir} has no config.json; pass the pipeline's OUT/student")
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    config = AutoConfig.from_pretrained(str(config_dir), **kwargs)
    if weights is None:
        return AutoModelForMaskedLM.from_config(config, **kwargs)
    weights = Path(weights)
    if weights.is_dir():
        check_model_files(weights, "student", "pass the pipeline's OUT/student_init (re-run init_weights.py) or "
                                              "another saved student")
        try:
            return AutoModelForMaskedLM.from_pretrained(str(weights), config=config, **kwargs)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load student weights from {weights}: {str(err).splitlines()[0]}") from err
    if not weights.is_file():
        raise UserError(f"--student_pretrained_weights {weights} does not exist")
    model = AutoModelForMaskedLM.from_config(config, **kwargs)
    state = load_state_dict_file(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise UserError(f"weights {weights} do not fit the student config {config_path} (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); pass weights saved from this architecture")
    model.tie_weights()
    return model


def model_card(facts: dict) -> str:
    """The `README.md` of an exported student (a Hugging Face model card): what it was distilled from and how.

    facts: "teacher" (path or None), "alignment" (a description or None), "losses" ({name: weight}), "temperature",
    "train_sequences", "updates", "final_train" ({loss name: value}), "best_valid" (or None), "parameters",
    "vocab_size", "model_type", optional "mlm_acc" and "command" (the training command line)."""
    weights = ", ".join(f"{name} {value:g}" for name, value in facts["losses"].items() if value) or "none"
    final = ", ".join(f"{name} {value:.4g}" for name, value in sorted(facts["final_train"].items())) or "not logged"
    lines = [
        "---", "library_name: transformers", "pipeline_tag: fill-mask", "tags:", "- knowledge-distillation",
        "- reduced-vocabulary", "---", "",
        f"# {facts['model_type']} student ({facts['parameters']:,} parameters, {facts['vocab_size']:,}-token vocabulary)",
        "",
        "Distilled with reduced-vocabulary knowledge distillation (Kolesnikova et al., arXiv 2205.02340): the "
        "student's vocabulary differs from the teacher's." if facts["teacher"] else
        "Trained with the masked-language-model loss alone (no teacher).",
        "",
        "| | |", "|---|---|",
        f"| teacher | {facts['teacher'] or '-'} |",
        f"| alignment of the KL term | {facts['alignment'] or '-'} |",
        f"| loss weights | {weights} (temperature {facts['temperature']:g}) |",
        f"| training sequences | {facts['train_sequences']:,} |",
        f"| updates | {facts['updates']:,} |",
        f"| final training losses | {final} |",
        f"| best validation loss | {'-' if facts['best_valid'] is None else format(facts['best_valid'], '.4g')} |",
        f"| parameters | {facts['parameters']:,} |",
        f"| vocabulary | {facts['vocab_size']:,} tokens |",
    ]
    if facts.get("mlm_acc") is not None:
        lines.append(f"| held-out MLM accuracy | {facts['mlm_acc']:.4f} |")
    lines += ["", "```python", "from transformers import pipeline", "",
              'fill = pipeline("fill-mask", model="<this directory>")', "```"]
    if facts.get("command"):
        lines += ["", "Trained with:", "", "```", facts["command"], "```"]
    return "\n".join(lines) + "\n"
