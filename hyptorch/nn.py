"""Hyperbolic layers on the Poincare ball (Ganea, Becigneul, Hofmann 2018; Khrulkov et al. 2020).

Curvature: every module holds ``c > 0`` (the ball has curvature -c and radius 1/sqrt(c)). A fixed ``c``
is a buffer (moves with ``.to()``, saved in the state dict); with ``train_c=True`` it is stored as the
parameter ``log_c`` and ``c = exp(log_c)``, so it stays positive whatever the optimiser does; the value
of ``log_c`` is clamped to ``[log C_MIN, log C_MAX]`` (the gradient passes through the clamp, so a
parameter pushed out of range can come back) so that ``c`` never underflows to 0 or overflows. The
property ``module.c`` returns the current value as a 0-dim tensor; assigning ``module.c = value`` sets it
in place (the parameter object is kept, so an optimiser holding it keeps working), e.g. to refresh a
curvature recomputed from data. Modules that consume ball points also accept ``c=`` in ``forward`` to
use another module's curvature (e.g. the trainable c of a ``ToPoincare`` in front of a ``HypLinear``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hyptorch import pmath

# Range of a trainable curvature (see the module docstring).
C_MIN = 1e-6
C_MAX = 1e6


class _Curved(nn.Module):
    """Base class holding the curvature ``c`` (fixed buffer or trainable ``log_c``)."""

    def __init__(self, c: float, train_c: bool = False) -> None:
        super().__init__()
        c = float(c)
        if not (c > 0 and math.isfinite(c)):
            raise ValueError(f"curvature c must be a positive finite number, got {c}")
        self.train_c = train_c
        if train_c:
            self.log_c = nn.Parameter(torch.tensor(math.log(c)))
        else:
            self.register_buffer("c_fixed", torch.tensor(c))

    @property
    def c(self) -> torch.Tensor:
        """Current curvature, a positive 0-dim tensor (differentiable when trainable)."""
        if not self.train_c:
            return self.c_fixed
        log_c = self.log_c
        # clamped value, identity gradient (x - x.detach() is exactly zero)
        clamped = log_c.detach().clamp(math.log(C_MIN), math.log(C_MAX)) + (log_c - log_c.detach())
        return clamped.exp()

    @c.setter
    def c(self, value: float | torch.Tensor) -> None:
        value = float(value)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"curvature c must be a positive finite number, got {value}")
        with torch.no_grad():
            if self.train_c:
                self.log_c.fill_(math.log(value))
            else:
                self.c_fixed.fill_(value)

    def _curvature(self, c: float | torch.Tensor | None) -> float | torch.Tensor:
        """``c`` if given (another module's curvature), else this module's."""
        return self.c if c is None else c

    def extra_repr(self) -> str:
        return f"c={self.c.item():.4g}, train_c={self.train_c}"


class _RiemannianGradient(torch.autograd.Function):
    """Identity in forward; in backward the gradient w.r.t. the ball point y is rescaled by
    ``1 / lambda_y^2 = (1 - c|y|^2)^2 / 4`` (Euclidean -> Riemannian gradient)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y, c)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        y, c = ctx.saved_tensors
        return pmath.rgrad(y, grad, c=c), None


class _BasePoint(_Curved):
    """Curvature plus an optional trainable base point ``expmap0(x_tangent)`` (``train_x``)."""

    def __init__(self, c: float, train_c: bool, train_x: bool, ball_dim: int | None) -> None:
        super().__init__(c, train_c)
        if train_x and ball_dim is None:
            raise ValueError("train_x=True needs ball_dim (the dimension of the base point)")
        self.train_x = train_x
        self.ball_dim = ball_dim
        # The base point is parametrised in the tangent space at 0 so that plain optimisers apply.
        self.x_tangent = nn.Parameter(torch.zeros(ball_dim)) if train_x else None

    def base_point(self, c: float | torch.Tensor) -> torch.Tensor | None:
        """The trainable base point on the ball, [ball_dim], or None without ``train_x``."""
        return None if self.x_tangent is None else pmath.expmap0(self.x_tangent, c=c)


class ToPoincare(_BasePoint):
    """Map Euclidean vectors into the ball: ``expmap0(u)`` (or ``expmap(x, u)`` at a trainable point x).

    With ``riemannian=True`` the gradient flowing back from the output point y is rescaled by
    ``(1 - c|y|^2)^2 / 4`` (Riemannian gradient). ``ball_dim`` is needed only with ``train_x``.
    Input [..., D] -> output [..., D], strictly inside the ball.
    """

    def __init__(
        self,
        c: float,
        train_c: bool = False,
        train_x: bool = False,
        ball_dim: int | None = None,
        riemannian: bool = True,
    ) -> None:
        super().__init__(c, train_c, train_x, ball_dim)
        self.riemannian = riemannian

    def forward(self, u: torch.Tensor, *, c: float | torch.Tensor | None = None) -> torch.Tensor:
        c = self._curvature(c)
        base = self.base_point(c)
        y = pmath.expmap0(u, c=c) if base is None else pmath.expmap(base, u, c=c)
        if self.riemannian:
            y = _RiemannianGradient.apply(y, torch.as_tensor(c, dtype=y.dtype, device=y.device).detach())
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, train_x={self.train_x}, riemannian={self.riemannian}"


class FromPoincare(_BasePoint):
    """Map ball points back to Euclidean vectors: ``logmap0(y)`` (or ``logmap(x, y)`` with ``train_x``).

    Input [..., D] -> output [..., D].
    """

    def __init__(
        self, c: float, train_c: bool = False, train_x: bool = False, ball_dim: int | None = None
    ) -> None:
        super().__init__(c, train_c, train_x, ball_dim)

    def forward(self, y: torch.Tensor, *, c: float | torch.Tensor | None = None) -> torch.Tensor:
        c = self._curvature(c)
        base = self.base_point(c)
        return pmath.logmap0(y, c=c) if base is None else pmath.logmap(base, y, c=c)


class HypLinear(_Curved):
    """Hyperbolic linear layer: ``(W (x)_c y) (+)_c expmap0(b)``.

    ``weight`` [out, in] is Xavier-uniform initialised (the Mobius matvec rescales the hyperbolic norm by
    about |Wy|/|y|, which Xavier keeps near 1); ``bias`` [out] is a tangent vector at the origin,
    initialised to zero (the layer starts as a pure Mobius matvec).
    Input [..., in] on the ball -> output [..., out] on the ball.
    """

    def __init__(
        self, in_features: int, out_features: int, c: float, bias: bool = True, train_c: bool = False
    ) -> None:
        super().__init__(c, train_c)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weight, zero bias."""
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, y: torch.Tensor, *, c: float | torch.Tensor | None = None) -> torch.Tensor:
        c = self._curvature(c)
        out = pmath.mobius_matvec(self.weight, y, c=c)
        if self.bias is None:
            return out
        return pmath.mobius_add(out, pmath.expmap0(self.bias, c=c), c=c)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {super().extra_repr()}"
        )


class HyperbolicMLR(_Curved):
    """Hyperbolic multinomial logistic regression (Ganea et al. 2018, eq. 25).

    Class k has a point ``p_k = expmap0(p_vals[k])`` and a normal ``a_k``, the parallel transport from
    the origin of ``a_vals[k]``. Its logit is the signed, scaled distance to the gyroplane:
    ``(lambda_pk |a_k| / sqrt c) asinh(2 sqrt(c) <w, a_k> / ((1 - c|w|^2) |a_k|))`` with
    ``w = (-p_k) (+)_c x``. Computed in closed form from inner products ([B, K] memory, no [B, K, D]).
    Input [..., ball_dim] on the ball -> logits [..., n_classes].
    """

    def __init__(self, ball_dim: int, n_classes: int, c: float, train_c: bool = False) -> None:
        super().__init__(c, train_c)
        self.ball_dim = ball_dim
        self.n_classes = n_classes
        self.a_vals = nn.Parameter(torch.empty(n_classes, ball_dim))
        self.p_vals = nn.Parameter(torch.empty(n_classes, ball_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normals like ``nn.Linear`` weights (Kaiming-uniform); points at the origin."""
        nn.init.kaiming_uniform_(self.a_vals, a=math.sqrt(5))
        nn.init.zeros_(self.p_vals)

    def forward(self, x: torch.Tensor, *, c: float | torch.Tensor | None = None) -> torch.Tensor:
        c = torch.as_tensor(self._curvature(c), dtype=x.dtype, device=x.device)
        sqrt_c = c.sqrt()
        p = pmath.expmap0(self.p_vals, c=c)  # [K, D]
        a_norm = self.a_vals.norm(dim=-1).clamp_min(1e-15)  # [K]
        a_unit = self.a_vals / a_norm.unsqueeze(-1)
        # With a_k = (1 - c|p_k|^2) a_vals[k]: lambda_pk |a_k| = 2 |a_vals[k]| and a_k/|a_k| = a_unit[k].
        # For w = (-p) (+) x = (A (-p) + B x) / den, with A = 1 - 2c<p,x> + c|x|^2, B = 1 - c|p|^2, and
        # 1 - c|w|^2 = (1 - c|p|^2)(1 - c|x|^2) / den, the asinh argument reduces to
        # 2 sqrt(c) (B <x,a> - A <p,a>) / ((1 - c|p|^2)(1 - c|x|^2)).
        xp = x @ p.T  # [..., K]
        xa = x @ a_unit.T  # [..., K]
        x2 = x.pow(2).sum(dim=-1, keepdim=True)  # [..., 1]
        p2 = p.pow(2).sum(dim=-1)  # [K]
        pa = (p * a_unit).sum(dim=-1)  # [K]
        one_minus_p2 = (1 - c * p2).clamp_min(torch.finfo(x.dtype).eps)
        one_minus_x2 = (1 - c * x2).clamp_min(torch.finfo(x.dtype).eps)
        coef_p = 1 - 2 * c * xp + c * x2
        arg = 2 * sqrt_c * (one_minus_p2 * xa - coef_p * pa) / (one_minus_p2 * one_minus_x2)
        return 2 * a_norm / sqrt_c * torch.asinh(arg)

    def extra_repr(self) -> str:
        return f"ball_dim={self.ball_dim}, n_classes={self.n_classes}, {super().extra_repr()}"


class HyperbolicDistanceLayer(_Curved):
    """Pairwise geodesic distances: x [..., N, D], y [..., M, D] -> [..., N, M].

    (Element-wise distances between matched points are :func:`hyptorch.pmath.dist`.)
    """

    def __init__(self, c: float, train_c: bool = False) -> None:
        super().__init__(c, train_c)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, *, c: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        return pmath.dist_matrix(x, y, c=self._curvature(c))
