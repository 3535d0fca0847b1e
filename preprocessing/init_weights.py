"""Step 8: initialise the student from the teacher (an HF model directory, `student_init/`).

- Transformer layers, `--init_strategy average` (default): the teacher's L_T layers are cut into L_S
  consecutive groups (12 -> 3: four each; 4 -> 3: 2, 1, 1) and every parameter of student layer k is the
  mean of that parameter over group k, truncated to the student's shape (the top-left block). Works for
  any L_S <= L_T and hidden sizes up to the teacher's. `--init_strategy select` copies chosen teacher
  layers instead, as DistilBERT's extraction does (`--layers 0,2,4,7,9,11`; default: L_S layers evenly
  spread from the first to the last).
- Vocabulary mapping: the student embedding (and output-layer row and bias) of a student token u is the
  mean of the teacher rows of the teacher tokens whose split contains u (special tokens map to
  themselves), truncated to the student's width. A student token no teacher split contains is split
  into teacher pieces itself and gets their mean (the teacher `[UNK]` row when that fails).
  Without `--t2s_mapping`, the vocabularies must be equal and rows are copied.
- Position embeddings (plus the teacher's token-type-0 embedding, which BERT adds to every position and
  DistilBERT does not have) and the embedding LayerNorm: truncated.
- The MLM head's transform and its LayerNorm: truncated copies (`--vocab_transform random` keeps the
  student's random ones).
Teacher: any `BertForMaskedLM` directory. Student: a DistilBERT or BERT config (`--student_name` holds
its config.json and tokenizer); the tokenizer files are copied into the output.

Fine-tuning mode (task-specific distillation, `distil-finetuned-en/`): when the teacher is a fine-tuned
`BertForSequenceClassification` (e.g. `train_single`'s `best_model/`), the student is a sequence classifier
with the same labels; embeddings and layers are built as above (one vocabulary, rows copied), and the
teacher's pooler and classifier are copied truncated (into DistilBERT's `pre_classifier` and `classifier`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import _bootstrap  # noqa: F401
from common import check_output, load_pair, timed
from kdcore.artifacts import check_fingerprints, load_teacher2student
from kdcore.errors import UserError, run_cli
from kdcore.fsutil import staged_dir
from kdcore.model_io import check_vocab_fits, load_teacher
from kdcore.tokenizer_utils import UNMAPPED_PATTERN, greedy_split, write_vocab_txt

BERT_LAYER = {
    "q.weight": "attention.self.query.weight", "q.bias": "attention.self.query.bias",
    "k.weight": "attention.self.key.weight", "k.bias": "attention.self.key.bias",
    "v.weight": "attention.self.value.weight", "v.bias": "attention.self.value.bias",
    "o.weight": "attention.output.dense.weight", "o.bias": "attention.output.dense.bias",
    "ln1.weight": "attention.output.LayerNorm.weight", "ln1.bias": "attention.output.LayerNorm.bias",
    "ffn1.weight": "intermediate.dense.weight", "ffn1.bias": "intermediate.dense.bias",
    "ffn2.weight": "output.dense.weight", "ffn2.bias": "output.dense.bias",
    "ln2.weight": "output.LayerNorm.weight", "ln2.bias": "output.LayerNorm.bias",
}
DISTILBERT_LAYER = {
    "q.weight": "attention.q_lin.weight", "q.bias": "attention.q_lin.bias",
    "k.weight": "attention.k_lin.weight", "k.bias": "attention.k_lin.bias",
    "v.weight": "attention.v_lin.weight", "v.bias": "attention.v_lin.bias",
    "o.weight": "attention.out_lin.weight", "o.bias": "attention.out_lin.bias",
    "ln1.weight": "sa_layer_norm.weight", "ln1.bias": "sa_layer_norm.bias",
    "ffn1.weight": "ffn.lin1.weight", "ffn1.bias": "ffn.lin1.bias",
    "ffn2.weight": "ffn.lin2.weight", "ffn2.bias": "ffn.lin2.bias",
    "ln2.weight": "output_layer_norm.weight", "ln2.bias": "output_layer_norm.bias",
}
NAMES = {
    "bert": {
        "layer": "bert.encoder.layer.{i}.{name}", "layer_map": BERT_LAYER,
        "word": "bert.embeddings.word_embeddings.weight", "pos": "bert.embeddings.position_embeddings.weight",
        "type": "bert.embeddings.token_type_embeddings.weight",
        "emb_ln.weight": "bert.embeddings.LayerNorm.weight", "emb_ln.bias": "bert.embeddings.LayerNorm.bias",
        "head.weight": "cls.predictions.transform.dense.weight", "head.bias": "cls.predictions.transform.dense.bias",
        "head_ln.weight": "cls.predictions.transform.LayerNorm.weight",
        "head_ln.bias": "cls.predictions.transform.LayerNorm.bias",
        "out.weight": "cls.predictions.decoder.weight", "out.bias": "cls.predictions.bias",
    },
    "distilbert": {
        "layer": "distilbert.transformer.layer.{i}.{name}", "layer_map": DISTILBERT_LAYER,
        "word": "distilbert.embeddings.word_embeddings.weight",
        "pos": "distilbert.embeddings.position_embeddings.weight", "type": None,
        "emb_ln.weight": "distilbert.embeddings.LayerNorm.weight", "emb_ln.bias": "distilbert.embeddings.LayerNorm.bias",
        "head.weight": "vocab_transform.weight", "head.bias": "vocab_transform.bias",
        "head_ln.weight": "vocab_layer_norm.weight", "head_ln.bias": "vocab_layer_norm.bias",
        "out.weight": "vocab_projector.weight", "out.bias": "vocab_projector.bias",
    },
}
HEAD_KEYS = ("head.weight", "head.bias", "head_ln.weight", "head_ln.bias")
CLASSIFIER_KEYS = {
    "bert": {"bert.pooler.dense.weight": "bert.pooler.dense.weight", "bert.pooler.dense.bias": "bert.pooler.dense.bias",
             "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"},
    "distilbert": {"bert.pooler.dense.weight": "pre_classifier.weight", "bert.pooler.dense.bias": "pre_classifier.bias",
                   "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"},
}


def n_layers(config) -> int:
    return config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layers


def layer_groups(n_teacher: int, n_student: int) -> list[np.ndarray]:
    """Consecutive groups of teacher layer indices, one per student layer (sizes differ by at most one)."""
    if not 1 <= n_student <= n_teacher:
        raise UserError(f"the student has {n_student} layers and the teacher {n_teacher}; the student needs "
                        "between 1 and the teacher's number of layers")
    return np.array_split(np.arange(n_teacher), n_student)


def selected_layers(n_teacher: int, n_student: int, layers: list[int] | None) -> list[np.ndarray]:
    """One teacher layer per student layer: `layers`, or L_S indices evenly spread over 0..L_T-1."""
    if layers is None:
        layer_groups(n_teacher, n_student)  # the same layer-count check as `average`
        layers = np.linspace(0, n_teacher - 1, n_student).round().astype(int).tolist()
    if len(layers) != n_student or len(set(layers)) != len(layers) or not all(0 <= i < n_teacher for i in layers):
        raise UserError(f"--layers {','.join(map(str, layers))} must name {n_student} distinct teacher layers "
                        f"(0..{n_teacher - 1}), one per student layer")
    return [np.array([i]) for i in layers]


INIT_STRATEGIES = {
    "average": lambda n_teacher, n_student, layers: layer_groups(n_teacher, n_student),
    "select": selected_layers,
}


def truncate(tensor, shape):
    """Top-left block of `tensor` with `shape`."""
    if any(s > t for s, t in zip(shape, tensor.shape)):
        raise UserError(f"a student tensor of shape {tuple(shape)} is larger than the teacher's "
                        f"{tuple(tensor.shape)}; the student must not be wider than the teacher")
    return tensor[tuple(slice(0, s) for s in shape)].clone()


def vocab_mapping(t_vocab: list[str], s_vocab: list[str], splits: list[list[int]], t_special: set[str],
                  t_unk: str, s_unk_id: int):
    """scipy CSR [V_S, V_T]: row u averages the teacher tokens whose split contains u (see module doc)."""
    from scipy import sparse

    rows, cols = [], []
    for v, (token, split) in enumerate(zip(t_vocab, splits)):
        if token in t_special or (split and s_unk_id not in split):
            for u in set(split):
                rows.append(u)
                cols.append(v)
    covered = set(rows)
    t_index = {tok: i for i, tok in enumerate(t_vocab)}
    for u, token in enumerate(s_vocab):
        if u in covered or UNMAPPED_PATTERN.match(token):
            continue
        for piece in set(greedy_split(token, t_index, t_unk)):
            rows.append(u)
            cols.append(t_index[piece])
    rows_a, cols_a = np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)
    counts = np.bincount(rows_a, minlength=len(s_vocab))
    weights = 1.0 / counts[rows_a]
    return sparse.csr_matrix((weights, (rows_a, cols_a)), shape=(len(s_vocab), len(t_vocab)))


def init_student(teacher, student, mapping, vocab_transform: bool = True, strategy: str = "average",
                 layers: list[int] | None = None) -> dict:
    """Overwrite `student`'s parameters in place from `teacher`; `mapping` is the [V_S, V_T] CSR or None
    (equal vocabularies); `strategy` names an entry of INIT_STRATEGIES. Masked LMs get the vocabulary rows
    and the MLM head; sequence classifiers (fine-tuning mode) the pooler and classifier. Returns what was
    initialised."""
    import torch

    t_names, s_names = NAMES["bert"], NAMES[student.config.model_type]
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    done = {}

    def put(name: str, value) -> None:
        s_state[name].copy_(value.to(s_state[name].dtype))
        done[name] = tuple(s_state[name].shape)

    if strategy == "average" and layers is not None:
        raise UserError("--layers goes with --init_strategy select")
    groups = INIT_STRATEGIES[strategy](n_layers(teacher.config), n_layers(student.config), layers)
    classifier = "classifier.weight" in t_state
    with torch.no_grad():
        for k, group in enumerate(groups):
            for role, t_name in t_names["layer_map"].items():
                mean = torch.stack([t_state[t_names["layer"].format(i=i, name=t_name)] for i in group]).mean(0)
                s_name = s_names["layer"].format(i=k, name=s_names["layer_map"][role])
                put(s_name, truncate(mean, s_state[s_name].shape))
        pos = t_state[t_names["pos"]] + t_state[t_names["type"]][0]
        s_pos = s_state[s_names["pos"]]
        n_pos = min(pos.shape[0], s_pos.shape[0])
        put(s_names["pos"], torch.cat([truncate(pos[:n_pos], (n_pos, s_pos.shape[1])), s_pos[n_pos:]]))
        if s_names["type"] is not None:
            put(s_names["type"], truncate(torch.zeros_like(t_state[t_names["type"]]), s_state[s_names["type"]].shape))
        for key in ("emb_ln.weight", "emb_ln.bias"):
            put(s_names[key], truncate(t_state[t_names[key]], s_state[s_names[key]].shape))
        width = s_state[s_names["word"]].shape[1]
        rows = {"word": t_state[t_names["word"]][:, :width]}
        tied = False
        if classifier:
            for t_key, s_key in CLASSIFIER_KEYS[student.config.model_type].items():
                put(s_key, truncate(t_state[t_key], s_state[s_key].shape))
        else:
            for key in HEAD_KEYS if vocab_transform else ():
                put(s_names[key], truncate(t_state[t_names[key]], s_state[s_names[key]].shape))
            rows["out.bias"] = t_state[t_names["out.bias"]][:, None]
            tied = student.get_output_embeddings().weight is student.get_input_embeddings().weight
            if not tied:
                rows["out.weight"] = t_state[t_names["out.weight"]][:, :width]
        for key, table in rows.items():
            mapped = table if mapping is None else torch.from_numpy(mapping @ table.double().numpy())
            put(s_names[key], mapped.reshape(s_state[s_names[key]].shape))
    return {"layer_groups": [g.tolist() for g in groups], "tensors": len(done), "tied_output": tied,
            "mode": "fine-tuning" if classifier else "mlm"}


def _is_classifier(model_dir: str) -> bool:
    """True when `model_dir` holds a sequence classifier (a fine-tuned teacher: fine-tuning mode)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return any(arch.endswith("ForSequenceClassification") for arch in config.get("architectures") or [])


def load_classifier_teacher(path: str):
    """A fine-tuned BertForSequenceClassification (pooler and classifier included)."""
    from transformers import AutoModelForSequenceClassification

    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the fine-tuned teacher from {path}: {str(err).splitlines()[0]}") from err
    if model.config.model_type != "bert" or info["missing_keys"]:
        raise UserError(f"teacher {path} is not a complete BertForSequenceClassification (missing: "
                        f"{info['missing_keys'][:3]}); pass the best_model/ of a train_single run")
    return model


@dataclass(frozen=True)
class InitParams:
    """Parameters of `run` (step 8).

    teacher_name: teacher directory (BertForMaskedLM or fine-tuned BertForSequenceClassification + tokenizer);
    student_name: student directory (config.json + tokenizer);
    out: output HF model directory (student_init);
    t2s_mapping: path of teacher2student.json from step 2, or None for equal vocabularies;
    vocab_transform: copy the teacher's MLM transform (truncated) instead of keeping the student's random one;
    seed: torch seed of the parameters that are not copied;
    force: overwrite an existing output;
    strategy: layer initialisation, a key of INIT_STRATEGIES ("average" or "select");
    layers: with strategy "select", the teacher layer indices (0-based) to copy, one per student layer;
        None spreads them evenly.
    """

    teacher_name: str
    student_name: str
    out: str
    t2s_mapping: str | None = None
    vocab_transform: bool = True
    seed: int = 42
    force: bool = False
    strategy: str = "average"
    layers: list[int] | None = None


def run(params: InitParams) -> dict:
    """Build and save the initialised student; returns statistics."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    teacher_name, student_name, t2s_mapping = params.teacher_name, params.student_name, params.t2s_mapping
    out_dir = check_output(params.out, params.force)
    stats: dict = {}
    with timed(stats):
        pair = load_pair(teacher_name, student_name)
        if not (Path(student_name) / "config.json").is_file():
            raise UserError(f"student directory {student_name} has no config.json; run train_reduced_tok.py with "
                            "--student_config")
        config = AutoConfig.from_pretrained(student_name)
        if config.model_type not in NAMES:
            raise UserError(f"student config {student_name}/config.json is a {config.model_type}; use distilbert "
                            "or bert")
        if config.vocab_size != len(pair.s_vocab):
            raise UserError(f"student config vocab_size {config.vocab_size} != student tokenizer size "
                            f"{len(pair.s_vocab)} in {student_name}; re-run train_reduced_tok.py")
        finetuned = _is_classifier(teacher_name)
        teacher = load_classifier_teacher(teacher_name) if finetuned else load_teacher(teacher_name)
        check_vocab_fits(teacher_name, teacher.config.vocab_size, len(pair.t_vocab))
        if pair.t_vocab == pair.s_vocab:
            mapping = None
        elif t2s_mapping is not None:
            meta = load_teacher2student(t2s_mapping)
            check_fingerprints(meta["fingerprints"], pair.fingerprints, t2s_mapping)
            mapping = vocab_mapping(pair.t_vocab, pair.s_vocab, meta["splits"], set(pair.teacher.all_special_tokens),
                                    pair.t_special["unk"], pair.s_unk_id)
        else:
            raise UserError("the student vocabulary differs from the teacher's; pass --t2s_mapping "
                            "teacher2student.json")
        torch.manual_seed(params.seed)
        if finetuned:
            from transformers import AutoModelForSequenceClassification

            for key in ("num_labels", "id2label", "label2id", "problem_type"):
                setattr(config, key, getattr(teacher.config, key))
            student = AutoModelForSequenceClassification.from_config(config)
        else:
            student = AutoModelForMaskedLM.from_config(config)
        info = init_student(teacher, student, mapping, params.vocab_transform, params.strategy, params.layers)
        with staged_dir(out_dir) as tmp:
            student.save_pretrained(str(tmp))
            pair.student.save_pretrained(str(tmp))
            write_vocab_txt(pair.student, tmp)
            for name in ("student_tokenizer_stats.json",):
                if (Path(student_name) / name).is_file():
                    shutil.copy(Path(student_name) / name, tmp / name)
        stats.update(info, teacher_params=sum(p.numel() for p in teacher.parameters()),
                     student_params=sum(p.numel() for p in student.parameters()))
    return stats


def parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--layers {text!r} is not a comma-separated list of integers") from err


def add_layer_args(p: argparse.ArgumentParser) -> None:
    """--init_strategy and --layers (shared with run_pipeline.py)."""
    p.add_argument("--init_strategy", choices=tuple(INIT_STRATEGIES), default="average",
                   help="student layer k = mean of a group of teacher layers, or a copy of one selected layer")
    p.add_argument("--layers", type=parse_layers,
                   help="with --init_strategy select: the teacher layers to copy, e.g. 0,2,4,7,9,11")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher_name", required=True, help="teacher directory (BertForMaskedLM + tokenizer)")
    p.add_argument("--student_name", required=True, help="student directory (config.json + tokenizer)")
    p.add_argument("--out", required=True, help="output HF model directory (student_init)")
    p.add_argument("--t2s_mapping", help="teacher2student.json from step 2 (omit for equal vocabularies)")
    p.add_argument("--vocab_transform", choices=("copy", "random"), default="copy",
                   help="copy the teacher's MLM transform (truncated) or keep it random")
    add_layer_args(p)
    p.add_argument("--seed", type=int, default=42, help="seed of the parameters that are not copied")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    a = p.parse_args(argv)
    params = InitParams(
        teacher_name=a.teacher_name, student_name=a.student_name, out=a.out, t2s_mapping=a.t2s_mapping,
        vocab_transform=a.vocab_transform == "copy", seed=a.seed, force=a.force, strategy=a.init_strategy,
        layers=a.layers,
    )
    stats = run(params)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
