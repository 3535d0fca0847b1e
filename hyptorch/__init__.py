"""Hyperbolic (Poincare-ball) maths, layers and curvature estimation.

- :mod:`hyptorch.pmath`: functions on the ball (exp/log maps, Mobius operations, distances).
- :mod:`hyptorch.nn`: ``ToPoincare``, ``FromPoincare``, ``HypLinear``, ``HyperbolicMLR``,
  ``HyperbolicDistanceLayer``.
- :mod:`hyptorch.delta`: Gromov delta-hyperbolicity and the curvature it suggests.
"""

from hyptorch.delta import batched_delta_hyp, curvature_from_delta_rel, delta_hyp, estimate_curvature
from hyptorch.nn import FromPoincare, HyperbolicDistanceLayer, HyperbolicMLR, HypLinear, ToPoincare

__all__ = [
    "FromPoincare",
    "HypLinear",
    "HyperbolicDistanceLayer",
    "HyperbolicMLR",
    "ToPoincare",
    "batched_delta_hyp",
    "curvature_from_delta_rel",
    "delta_hyp",
    "estimate_curvature",
]
