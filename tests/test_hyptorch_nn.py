"""Hyperbolic layers: shapes, ball constraints, Riemannian backward, curvature handling, MLR."""

import math

import pytest
import torch

from hyptorch import pmath as pm
from hyptorch.nn import (
    C_MAX,
    C_MIN,
    FromPoincare,
    HyperbolicDistanceLayer,
    HyperbolicMLR,
    HypLinear,
    ToPoincare,
)


def _ball_points(n: int, d: int, c: float, dtype=torch.float32, max_frac: float = 0.9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g, dtype=dtype)
    r = torch.rand(n, 1, generator=g, dtype=dtype) * max_frac / math.sqrt(c)
    return v / v.norm(dim=-1, keepdim=True) * r


@pytest.mark.parametrize("train_x", [False, True])
def test_to_and_from_poincare_shapes_and_roundtrip(train_x):
    c = 0.5
    to_p = ToPoincare(c, train_x=train_x, ball_dim=6)
    from_p = FromPoincare(c, train_x=train_x, ball_dim=6)
    if train_x:
        with torch.no_grad():
            to_p.x_tangent.normal_(0, 0.3)
            from_p.x_tangent.copy_(to_p.x_tangent)
    u = torch.randn(3, 5, 6, dtype=torch.float64) * 0.5
    to_p.double()
    from_p.double()
    y = to_p(u)
    assert y.shape == u.shape
    assert torch.all(y.norm(dim=-1) < 1 / math.sqrt(c))
    torch.testing.assert_close(from_p(y), u)
    huge = to_p(torch.randn(4, 6, dtype=torch.float64) * 1e5)
    assert torch.isfinite(huge).all() and torch.all(huge.norm(dim=-1) < 1 / math.sqrt(c))


def test_train_x_needs_ball_dim():
    with pytest.raises(ValueError, match="ball_dim"):
        ToPoincare(1.0, train_x=True)
    with pytest.raises(ValueError, match="ball_dim"):
        FromPoincare(1.0, train_x=True)


@pytest.mark.parametrize("c", [1.0, 0.2])
def test_riemannian_backward_scales_gradient(c):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(16, 5, generator=g) * 0.8
    weights = torch.randn(16, 5, generator=g)  # loss = <weights, y>, a non-uniform output gradient
    grads = {}
    for riemannian in (False, True):
        leaf = u.clone().requires_grad_()
        y = ToPoincare(c, riemannian=riemannian)(leaf)
        (y * weights).sum().backward()
        grads[riemannian] = leaf.grad
    y = pm.expmap0(u, c=c)
    scale = (1 - c * y.pow(2).sum(-1, keepdim=True)) ** 2 / 4
    assert torch.all(scale < 0.25)
    torch.testing.assert_close(grads[True], grads[False] * scale)


@pytest.mark.parametrize(
    "module_fn", [lambda: ToPoincare(1.0, train_c=True), lambda: HypLinear(4, 4, 1.0, train_c=True)]
)
def test_trainable_curvature_gets_gradients_and_stays_positive(module_fn):
    for sign in (1.0, -1.0):
        module = module_fn()
        x = pm.expmap0(torch.randn(8, 4), c=1.0)
        module(x).norm(dim=-1).sum().backward()
        assert module.log_c.grad is not None and torch.isfinite(module.log_c.grad)
        assert module.log_c.grad != 0
        opt = torch.optim.SGD(module.parameters(), lr=1.0)
        opt.zero_grad()
        (sign * 1e8 * module.c).backward()  # a huge push downwards (sign +) or upwards (sign -)
        opt.step()
        c = module.c
        assert C_MIN * (1 - 1e-5) <= c.item() <= C_MAX * (1 + 1e-5)
        assert c.item() > 0
        out = module(x * 0.5 / math.sqrt(max(c.item(), 1.0)))
        assert torch.isfinite(out).all()
        # the clamp passes the gradient through, so a parameter pushed out of range can come back
        module.zero_grad()
        module.c.backward()
        assert module.log_c.grad != 0


def test_curvature_property_setter_and_state():
    fixed = ToPoincare(0.5)
    assert isinstance(fixed.c, torch.Tensor) and fixed.c.item() == pytest.approx(0.5)
    assert "c_fixed" in fixed.state_dict()
    fixed.c = 2.0
    assert fixed.c.item() == pytest.approx(2.0)
    trainable = HyperbolicMLR(3, 2, c=0.5, train_c=True)
    param = trainable.log_c
    trainable.c = 3.0
    assert trainable.log_c is param and trainable.c.item() == pytest.approx(3.0)
    assert trainable.c.requires_grad
    with pytest.raises(ValueError):
        ToPoincare(0.0)
    with pytest.raises(ValueError):
        fixed.c = -1.0
    loaded = ToPoincare(1.0)
    loaded.load_state_dict(fixed.state_dict())
    assert loaded.c.item() == pytest.approx(2.0)


def test_forward_curvature_override_shares_trainable_c():
    to_p = ToPoincare(0.7, train_c=True)
    lin = HypLinear(4, 3, c=1.0)
    y = lin(to_p(torch.randn(5, 4)), c=to_p.c)
    assert torch.all(y.norm(dim=-1) < 1 / math.sqrt(0.7))
    y.pow(2).sum().backward()
    assert to_p.log_c.grad is not None and to_p.log_c.grad != 0


def test_hyplinear_shapes_init_and_definition():
    c = 0.8
    lin = HypLinear(6, 3, c)
    bound = math.sqrt(6 / (6 + 3))
    assert lin.weight.abs().max() <= bound and torch.all(lin.bias == 0)
    x = _ball_points(10, 6, c)
    y = lin(x.unsqueeze(0))
    assert y.shape == (1, 10, 3)
    assert torch.all(y.norm(dim=-1) < 1 / math.sqrt(c))
    with torch.no_grad():
        lin.bias.normal_(0, 0.2)
    expected = pm.mobius_add(pm.mobius_matvec(lin.weight, x, c=c), pm.expmap0(lin.bias, c=c), c=c)
    torch.testing.assert_close(lin(x), expected)
    no_bias = HypLinear(6, 3, c, bias=False)
    assert no_bias.bias is None
    torch.testing.assert_close(no_bias(x), pm.mobius_matvec(no_bias.weight, x, c=c))


@pytest.mark.parametrize("c", [1.0, 0.3])
def test_hyplinear_identity(c):
    lin = HypLinear(5, 5, c).double()
    with torch.no_grad():
        lin.weight.copy_(torch.eye(5))
        lin.bias.zero_()
    x = _ball_points(20, 5, c, dtype=torch.float64, max_frac=0.99)
    torch.testing.assert_close(lin(x), x)


def _mlr_brute_force(mlr: HyperbolicMLR, x: torch.Tensor) -> torch.Tensor:
    """Ganea et al. eq. 25 class by class, with explicit Mobius addition and parallel transport."""
    c = mlr.c.item()
    sqrt_c = math.sqrt(c)
    logits = []
    for p_val, a_val in zip(mlr.p_vals, mlr.a_vals):
        p = pm.expmap0(p_val, c=c)
        a = a_val * (1 - c * p.pow(2).sum())  # parallel transport 0 -> p
        lam_p = 2 / (1 - c * p.pow(2).sum())
        w = pm.mobius_add(-p.expand_as(x), x, c=c)
        inner = (w * a).sum(-1)
        arg = 2 * sqrt_c * inner / ((1 - c * w.pow(2).sum(-1)) * a.norm())
        logits.append(lam_p * a.norm() / sqrt_c * torch.asinh(arg))
    return torch.stack(logits, dim=-1)


@pytest.mark.parametrize("c", [1.0, 0.4])
def test_mlr_matches_brute_force(c):
    mlr = HyperbolicMLR(ball_dim=4, n_classes=5, c=c).double()
    with torch.no_grad():
        mlr.p_vals.normal_(0, 0.5)
        mlr.a_vals.normal_(0, 1.0)
    x = _ball_points(12, 4, c, dtype=torch.float64)
    logits = mlr(x)
    assert logits.shape == (12, 5)
    torch.testing.assert_close(logits, _mlr_brute_force(mlr, x))
    assert mlr(x.view(3, 4, 4)).shape == (3, 4, 5)


def test_mlr_learns_separable_classes():
    torch.manual_seed(0)
    c = 1.0
    n = 200
    labels = torch.randint(0, 2, (n,))
    centers = torch.tensor([[0.5, 0.2, 0.0], [-0.4, -0.3, 0.1]])
    x = pm.project(centers[labels] + 0.1 * torch.randn(n, 3), c=c)
    mlr = HyperbolicMLR(ball_dim=3, n_classes=2, c=c)
    opt = torch.optim.Adam(mlr.parameters(), lr=0.05)
    initial_loss = torch.nn.functional.cross_entropy(mlr(x), labels).item()
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(mlr(x), labels)
        loss.backward()
        opt.step()
    accuracy = (mlr(x).argmax(-1) == labels).float().mean().item()
    assert accuracy >= 0.97
    assert loss.item() < 0.2 * initial_loss


def test_distance_layer():
    c = 0.6
    layer = HyperbolicDistanceLayer(c)
    x, y = _ball_points(4, 3, c, seed=1), _ball_points(6, 3, c, seed=2)
    d = layer(x, y)
    assert d.shape == (4, 6)
    torch.testing.assert_close(d, pm.dist(x[:, None], y[None], c=c))
    assert layer(x.expand(2, 4, 3), y.expand(2, 6, 3)).shape == (2, 4, 6)
