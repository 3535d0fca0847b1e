"""`kdcore.trainer_core`: the schedule, the optimizer and its step, and the hidden-loss builder that train.py and
the GLUE trainer share."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from kdcore.trainer_core import (
    LrSchedule,
    PlateauScaler,
    build_optimizer,
    grad_scaler,
    hidden_config,
    optimizer_step,
    store_linears_in,
)


def test_plateau_scaler_min_mode_is_torch_reduce_lr_on_plateau():
    """The factor follows torch's ReduceLROnPlateau (relative threshold, patience, cooldown, min_lr)."""
    values = [1.0, 0.995, 0.994, 0.993, 0.992, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    scaler = PlateauScaler(1.0, factor=0.5, patience=2, cooldown=1, threshold=1e-2, min_lr=0.2)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=2, cooldown=1,
                                                           threshold=1e-2, min_lr=0.2)
    for value in values:
        scaler.step(value)
        reference.step(value)
        assert scaler.scale == pytest.approx(optimizer.param_groups[0]["lr"])


def test_plateau_scaler_max_mode_counts_higher_as_better():
    scaler = PlateauScaler(1.0, factor=0.5, patience=0, cooldown=0, threshold=0.0, min_lr=0.0, mode="max")
    assert [scaler.step(v) for v in (-0.2, -0.1, -0.1, 0.3, 0.2)] == [False, False, True, False, True]
    assert scaler.scale == 0.25
    with pytest.raises(ValueError):
        PlateauScaler(1.0, mode="up")


def test_lr_schedule_warmup_decay_and_plateau():
    constant = LrSchedule(2.0, total_steps=10, warmup_prop=0.25, plateau=PlateauScaler(2.0, patience=0, cooldown=0))
    assert constant.warmup == 3  # ceil(2.5): a positive warm-up share always warms up
    assert [constant.lr(s) for s in range(4)] == pytest.approx([2 / 3, 4 / 3, 2.0, 2.0])
    assert not constant.on_validation(1.0) and not constant.on_validation(math.nan)
    assert constant.on_validation(1.5) and constant.lr(5) == pytest.approx(1.0)
    linear = LrSchedule(1.0, total_steps=4, decay="linear")
    assert [linear.lr(s) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=9.0)
    assert linear.apply(optimizer, 2) == pytest.approx(0.5) and optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


def test_optimizer_groups_and_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    optimizer = build_optimizer(model.named_parameters(), lr=0.1, weight_decay=0.01, eps=1e-6, betas=(0.9, 0.98))
    decay, no_decay = optimizer.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])] and decay["weight_decay"] == 0.01
    assert len(no_decay["params"]) == 2 and no_decay["weight_decay"] == 0.0  # biases; the frozen norm is left out
    assert decay["betas"] == (0.9, 0.98)
    model(torch.randn(5, 3)).pow(2).sum().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    before = model[0].weight.detach().clone()
    norm = optimizer_step(optimizer, grad_scaler(torch.device("cpu"), "fp32"), model.parameters(), max_grad_norm=1e-3)
    assert norm == pytest.approx(float(grads.norm()), rel=1e-5)
    assert not torch.equal(before, model[0].weight) and all(p.grad is None for p in model.parameters())


def test_lr_scales_make_groups_that_the_schedule_keeps():
    model = torch.nn.ModuleDict({"body": torch.nn.Linear(3, 4), "aligner": torch.nn.Linear(4, 2)})
    optimizer = build_optimizer(model.named_parameters(), lr=0.1, weight_decay=0.01, eps=1e-6,
                                lr_scales={"aligner.": 10.0})
    groups = [(g["lr_scale"], g["weight_decay"], [p.shape for p in g["params"]]) for g in optimizer.param_groups]
    assert groups == [(1.0, 0.01, [torch.Size([4, 3])]), (1.0, 0.0, [torch.Size([4])]),
                      (10.0, 0.01, [torch.Size([2, 4])]), (10.0, 0.0, [torch.Size([2])])]
    schedule = LrSchedule(1e-3, total_steps=10, warmup_prop=0.5)
    base = schedule.apply(optimizer, 2)
    assert base == pytest.approx(schedule.lr(2)) and base < 1e-3
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([base, base, 10 * base, 10 * base])
    # without scales: the two groups of before, at the base rate
    plain = build_optimizer(model.named_parameters(), lr=0.1, weight_decay=0.01, eps=1e-6)
    assert [g["lr_scale"] for g in plain.param_groups] == [1.0, 1.0] and len(plain.param_groups[0]["params"]) == 2


def _hidden_args(**overrides) -> argparse.Namespace:
    values = {"alpha_mse": 0.0, "alpha_cos": 0.0, "alpha_contrastive": 1.0, "hidden_distil_type": None,
              "projection_strategy": "last", "t_s_layers_ids": None, "project_to": "teacher", "intermediate_dim": None,
              "train_projections": True, "train_weights": True, "n_negative_samples": 4,
              "negative_sampling_strategy": "student", "teacher_student_prop": 0.5, "contrastive_temperature": None,
              "temperature": 2.0, "from_one_sample": False, "add_neg_size_constant": True}
    return argparse.Namespace(**{**values, **overrides})


def test_hidden_config_is_one_rule_for_both_command_lines():
    cfg = hidden_config(_hidden_args(), n_train=200)
    assert cfg.losses == ("contrastive",) and cfg.temperature == 2.0  # falls back to --temperature
    assert cfg.noise_prob == pytest.approx(1 / 200)
    assert hidden_config(_hidden_args(contrastive_temperature=0.5), None).temperature == 0.5
    assert hidden_config(_hidden_args(), None).noise_prob == 0.0  # set later, once the data size is known
    assert hidden_config(_hidden_args(alpha_contrastive=0.0), 10) is None


def test_fp16_grad_scaler_skips_inf_steps_and_backs_off():
    """The fp16 path on the CPU: a step whose gradients hold an inf is skipped and halves the scale; a finite step
    updates the weights at the unscaled gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model.named_parameters(), lr=0.1, weight_decay=0.0, eps=1e-6)
    scaler = grad_scaler(torch.device("cpu"), "fp16")
    assert scaler.is_enabled() and not grad_scaler(torch.device("cpu"), "bf16").is_enabled()
    scale = scaler.get_scale()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.randn(4, 3)).sum()).backward()
    model.weight.grad[0, 0] = float("inf")
    optimizer_step(optimizer, scaler, model.parameters(), max_grad_norm=1.0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert scaler.get_scale() == scale / 2
    x = torch.randn(4, 3)
    scaler.scale(model(x).sum()).backward()
    unscaled = model.weight.grad / scaler.get_scale()
    norm = optimizer_step(optimizer, scaler, model.parameters(), max_grad_norm=1e9)
    assert norm == pytest.approx(float(torch.cat([unscaled.reshape(-1), torch.full((2,), 4.0)]).norm()), rel=1e-5)
    assert not torch.equal(before[0], model.weight) and scaler.get_scale() == scale / 2


def test_device_choice(monkeypatch):
    from kdcore.errors import UserError
    from utils import choose_device, init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu") and choose_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        choose_device("cuda")
    with pytest.raises(UserError, match="must be auto, cpu or cuda"):
        choose_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert choose_device("auto", local_rank=3) == torch.device("cuda", 1)
    assert choose_device("cpu", local_rank=3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("auto")
    assert (info.rank, info.world_size, info.backend, info.device) == (0, 1, None, torch.device("cpu"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_linears_stored_in_the_autocast_dtype_give_identical_outputs(precision):
    """A frozen BERT's Linears stored once in the autocast dtype: the same logits and hidden states under autocast,
    the embeddings stay fp32 although the decoder's weight was tied to them; fp32 stores nothing."""
    from transformers import BertConfig, BertForMaskedLM

    from kdcore.trainer_core import PRECISIONS

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=16)).eval().requires_grad_(False)
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0

    def forward():
        with torch.no_grad(), torch.autocast("cpu", dtype=PRECISIONS[precision]):
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return [out.logits, *out.hidden_states]

    before = forward()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    expected = sum(p.numel() for m in linears for p in (m.weight, m.bias) if p is not None)
    assert store_linears_in(model, "fp32") == 0
    assert store_linears_in(model, precision) == expected
    assert all(p.dtype == PRECISIONS[precision] and not p.requires_grad for m in linears for p in m.parameters())
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.float32
    assert model.bert.encoder.layer[0].output.LayerNorm.weight.dtype == torch.float32
    after = forward()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert store_linears_in(model, precision) == 0  # already stored
