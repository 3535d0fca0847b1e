"""Curvature of the Poincare ball suggested by a model's outputs (Gromov delta-hyperbolicity, after
Khrulkov et al., "Hyperbolic Image Embeddings", CVPR 2020).

1. Sample `n_samples` output vectors of the model at random real positions of random sequences of the
   data (the validation split by default): MLM logits over the whole vocabulary (as the original code), or
   with `vectors="hidden"` the last hidden states.
2. PCA to `n_components`, Euclidean distance matrix, Gromov delta (four-point condition, Gromov products
   with the first point as base point), relative delta = 2 delta / diameter, c = (0.144 / relative delta)^2;
   the mean of c over `n_tries` random subsets (`hyptorch.delta.estimate_curvature`).

Library: `sample_output_vectors` (used by `train.py hyperbolic --init_c ...` and `--adjust_c
recompute_after_epoch`, which estimate c with `kdcore.trainer_core.fit_curvature`), `model_curvature` (the CLI's
sample and estimate). CLI:

    python delta.py --model TEACHER_DIR --binarized_data_folder OUT/processed_binarized --side teacher \
        [--n_samples 1000] [--n_components 100] [--n_tries 3] [--out c.json]

prints the curvature and its details as JSON (and writes them to `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdcore.errors import UserError, run_cli

SIDES = ("teacher", "student")
VECTORS = ("logits", "hidden")


@torch.no_grad()
def sample_rows(model: nn.Module, n_items: int, rows_of: Callable[[np.ndarray], torch.Tensor], n_samples: int,
                batch_size: int, seed: int, finish: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
    """fp32 CPU [n, D]: up to `n_samples` rows of `model`'s outputs, `model` in eval mode (its previous mode
    restored after). The `n_items` examples are visited in a random order (numpy `default_rng(seed)`) in
    batches of `batch_size`; rows_of(indices) gives the candidate rows of a batch, and the batch that completes
    the sample contributes a random subset, passed through `finish` (when given) after the subsetting.
    An empty sample is a [0, 1] tensor."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_items)
    was_training = model.training
    model.eval()
    parts, total = [], 0
    try:
        for start in range(0, len(order), batch_size):
            if total >= n_samples:
                break
            rows = rows_of(order[start:start + batch_size])
            need = n_samples - total
            if rows.shape[0] > need:
                keep = torch.from_numpy(np.sort(rng.choice(rows.shape[0], need, replace=False))).to(rows.device)
                rows = rows.index_select(0, keep)
            if finish is not None:
                rows = finish(rows)
            parts.append(rows.float().cpu())
            total += rows.shape[0]
    finally:
        model.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0, 1)


@torch.no_grad()
def sample_output_vectors(model: nn.Module, data, collator, side: str, n_samples: int, batch_size: int = 16,
                          device: torch.device | str | None = None, seed: int = 0,
                          vectors: str = "logits") -> torch.Tensor:
    """fp32 CPU [n, D] output vectors of `model` at up to `n_samples` random real positions.

    data: an `LmSeqsDataset`; collator: a `Collator`; side "teacher" reads the sequences' teacher tokens
    (`t_ids`), "student" the student tokens (`s_ids`), unmasked. Sequences are visited in a random order
    (numpy `default_rng(seed)`), every real position of a visited sequence is a candidate, and the batch that
    completes the sample contributes a random subset. vectors: "logits" (MLM head, [n, V]) or "hidden"
    ([n, D_hidden]); logits are computed only at the sampled positions. The model runs in eval mode and is
    put back in its previous mode.
    """
    from kdcore.step_runner import base_model, head_transform, output_layer

    if side not in SIDES or vectors not in VECTORS:
        raise ValueError(f"side must be one of {SIDES} and vectors one of {VECTORS}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ids_key, mask_key = ("t_ids", "t_mask") if side == "teacher" else ("s_ids", "s_mask")

    def rows_of(indices: np.ndarray) -> torch.Tensor:
        batch = collator(data.gather(indices))
        ids, mask = batch[ids_key].to(device), batch[mask_key].to(device)
        return base_model(model)(input_ids=ids, attention_mask=mask).last_hidden_state[mask]

    def to_logits(hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = output_layer(model)
        return nn.functional.linear(head_transform(model)(hidden), weight, bias)

    x = sample_rows(model, len(data), rows_of, n_samples, batch_size, seed,
                    finish=to_logits if vectors == "logits" else None)
    if x.shape[0] < 2:
        raise UserError(f"only {x.shape[0]} output vectors found in the data; the curvature needs at least 2 (use "
                        "more data or a larger --valid_prop)")
    return x


def model_curvature(model: nn.Module, data, collator, side: str, n_samples: int = 1000, n_components: int = 100,
                    n_tries: int = 3, batch_size: int = 16, device: torch.device | str | None = None, seed: int = 0,
                    vectors: str = "logits") -> tuple[float, dict]:
    """(c, details): the curvature suggested by `n_samples` output vectors of `model` on `data` (see
    `sample_output_vectors` and `hyptorch.delta.estimate_curvature`). A tree-like sample (relative delta ~ 0) is a one-line UserError naming the fix.
    """
    from hyptorch.delta import estimate_curvature

    x = sample_output_vectors(model, data, collator, side, n_samples, batch_size, device, seed, vectors)
    try:
        c, details = estimate_curvature(x, n_components=n_components, n_tries=n_tries, n_samples=n_samples,
                                        seed=seed)
    except ValueError as err:
        raise UserError(f"cannot estimate the curvature from the {side}'s outputs: {err}") from err
    details.update(n_vectors=int(x.shape[0]), side=side, vectors=vectors, c_mean=c)
    return c, details


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory (teacher BertForMaskedLM or a student)")
    p.add_argument("--binarized_data_folder", required=True, help="shard set (OUT/processed_binarized)")
    p.add_argument("--side", choices=SIDES, required=True, help="which tokens of the shards the model reads")
    p.add_argument("--split", choices=("valid", "train"), default="valid", help="part of every shard to sample")
    p.add_argument("--valid_prop", type=float, default=0.1, help="validation share, as in train.py")
    p.add_argument("--n_samples", type=int, default=1000, help="output vectors sampled")
    p.add_argument("--n_components", type=int, default=100, help="PCA components")
    p.add_argument("--n_tries", type=int, default=3, help="random subsets averaged")
    p.add_argument("--vectors", choices=VECTORS, default="logits", help="MLM logits or last hidden states")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", help="also write the result to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kdcore.fsutil import atomic_write_json
    from kdcore.model_io import load_student, load_teacher
    from kdcore.shard_io import open_shards, read_index
    from lm_seqs_dataset import Collator, LmSeqsDataset
    from utils import choose_device

    for flag in ("n_samples", "n_components", "n_tries", "batch_size"):
        if getattr(a, flag) < (2 if flag == "n_samples" else 1):
            raise UserError(f"--{flag} {getattr(a, flag)} is too small")
    if not Path(a.binarized_data_folder).is_dir():
        raise UserError(f"--binarized_data_folder {a.binarized_data_folder} is not a directory")
    model = load_teacher(a.model) if a.side == "teacher" else load_student(a.model, a.model)
    index = read_index(a.binarized_data_folder)
    vocab = index[f"{a.side}_vocab_size"]
    if model.config.vocab_size != vocab:
        raise UserError(f"{a.model} has a {model.config.vocab_size}-token vocabulary, the {a.side} side of "
                        f"{a.binarized_data_folder} {vocab}; pass the matching --side or model")
    data = LmSeqsDataset(open_shards(a.binarized_data_folder), a.valid_prop, a.split)
    if len(data) == 0:
        raise UserError(f"the {a.split} split of {a.binarized_data_folder} is empty; change --split or --valid_prop")
    device = choose_device(a.device)
    model.to(device)
    pad = model.config.pad_token_id or 0
    c, details = model_curvature(model, data, Collator(pad, pad), a.side, a.n_samples, a.n_components, a.n_tries,
                                 a.batch_size, device, a.seed, a.vectors)
    result = {"model": str(a.model), "data": str(a.binarized_data_folder), "split": a.split, **details,
              "c_per_try": details["c"], "c": c}
    if a.out:
        atomic_write_json(Path(a.out), result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
