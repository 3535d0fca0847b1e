"""`utils.adamw`: the fused AdamW where it applies, the same updates as the default implementation, state
dicts that load across the two (`utils.load_optimizer_state`), and GradScaler's skipped steps."""

from __future__ import annotations

import copy
import math

import torch

from utils import adamw, load_optimizer_state

OPTIONS = {"lr": 1e-2, "betas": (0.9, 0.98), "eps": 1e-6}


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=gen)), torch.nn.Parameter(torch.randn(3, generator=gen))]


def groups(params: list[torch.nn.Parameter]) -> list[dict]:
    return [{"params": params[:1], "weight_decay": 0.01}, {"params": params[1:], "weight_decay": 0.0}]


def set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def run(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: range) -> None:
    for step in steps:
        set_grads(params, step)
        optimizer.step()


def test_fused_on_cpu_with_the_default_update_and_fallback_elsewhere():
    fused_params, plain_params = make_params(), make_params()
    fused = adamw(groups(fused_params), **OPTIONS)
    plain = torch.optim.AdamW(groups(plain_params), **OPTIONS)
    assert fused.defaults["fused"] is True and plain.defaults["fused"] is None
    run(fused, fused_params, range(5))
    run(plain, plain_params, range(5))
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    meta = torch.nn.Parameter(torch.empty(2, 2, device="meta"))
    assert adamw([{"params": [meta]}], **OPTIONS).defaults["fused"] is None


def test_state_dicts_load_across_implementations_keeping_the_loader_s():
    params = make_params()
    fused = adamw(groups(params), **OPTIONS)
    run(fused, params, range(3))
    snapshot = [p.detach().clone() for p in params]
    state = copy.deepcopy(fused.state_dict())  # the state tensors are updated in place
    run(fused, params, range(3, 6))
    resumed_params = [torch.nn.Parameter(s.clone()) for s in snapshot]
    resumed = torch.optim.AdamW(groups(resumed_params), **OPTIONS)
    load_optimizer_state(resumed, state)  # fused -> default
    assert resumed.param_groups[0]["fused"] is None
    run(resumed, resumed_params, range(3, 6))
    for a, b in zip(params, resumed_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    back_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    back = adamw(groups(back_params), **OPTIONS)
    load_optimizer_state(back, resumed.state_dict())  # default -> fused
    assert back.param_groups[0]["fused"] is True and float(back.state[back_params[0]]["step"]) == 6
    run(back, back_params, range(6, 8))
    run(fused, params, range(6, 8))
    for a, b in zip(params, back_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_grad_scaler_skips_steps_with_inf_gradients():
    params = make_params()
    optimizer = adamw(groups(params), **OPTIONS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=True)
    for step, bad in ((0, False), (1, True), (2, False)):
        before = [p.detach().clone() for p in params]
        loss = sum((p * (step + 1)).sum() for p in params) * (math.inf if bad else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        changed = [not torch.equal(a, b) for a, b in zip(before, params)]
        assert changed == [not bad] * len(params)
    assert float(optimizer.state[params[0]]["step"]) == 2 and scaler.get_scale() == 2.0**9
