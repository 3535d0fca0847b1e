"""Gromov delta-hyperbolicity of point sets and the Poincare-ball curvature it suggests.

After Khrulkov, Mirvakhabova, Ustinova, Oseledets, Lempitsky, "Hyperbolic Image Embeddings" (CVPR 2020):
the relative delta ``delta_rel = 2 delta / diam`` of a sample of embeddings gives the curvature
``c = (0.144 / delta_rel)^2`` of a Poincare ball in which the sample fits with the same relative delta
(0.144 is the relative delta they measured for the Poincare disk).

Convention: the four-point condition is evaluated with the FIRST point of the distance matrix as base
point w. With Gromov products ``(x|y) = (d(w,x) + d(w,y) - d(x,y)) / 2``,
``delta = max_{x,y} (max_z min((x|z), (z|y)) - (x|y))``: a (max, min) matrix product, done here in row
blocks with a loop over z (about 1 s for N = 1000 on one CPU core; memory O(N^2)).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

# Relative delta of the Poincare disk measured by Khrulkov et al. (2020).
POINCARE_DELTA_REL = 0.144

# Relative deltas at or below this are float64 rounding noise of a tree-like sample (collinear points
# give ~1e-14), not a measurement: they would yield curvatures of 1e16 and more.
TREE_LIKE_DELTA_REL = 1e-9


def _as_float64_array(a: np.ndarray | torch.Tensor) -> np.ndarray:
    """A float64 numpy array (tensors are detached and moved to the CPU)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().to(torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def delta_hyp(dismat: np.ndarray | torch.Tensor, block_size: int = 64) -> float:
    """Gromov delta of a finite metric space, base point = its first point.

    ``dismat``: [N, N] symmetric distance matrix (numpy array or tensor; computed in float64 numpy).
    The (max, min) product runs over blocks of ``block_size`` rows, looping over the middle index z so
    that the [block, N] running maximum stays in cache (numpy's element-wise kernels are single-threaded,
    so this does not fight other processes for cores); memory is O(N^2 + block N).
    Returns delta >= 0 (0 for a tree metric, up to rounding).
    """
    d = _as_float64_array(dismat)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"delta_hyp: expected a square [N, N] distance matrix, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("delta_hyp: the distance matrix has non-finite entries")
    n = d.shape[0]
    if n == 0:
        raise ValueError("delta_hyp: empty distance matrix")
    # Gromov products with base point 0: (x|y) = (d(0,x) + d(0,y) - d(x,y)) / 2, shape [N, N].
    gromov = (d[0][:, None] + d[0][None, :] - d) / 2
    delta = 0.0
    for start in range(0, n, block_size):
        rows = gromov[start : start + block_size]  # (x|z) for the x of this block: [b, N]
        maxmin = np.full(rows.shape, -np.inf)  # max_z min((x|z), (z|y)): [b, N]
        tmp = np.empty_like(rows)
        for z in range(n):
            np.minimum(rows[:, z, None], gromov[z][None, :], out=tmp)
            np.maximum(maxmin, tmp, out=maxmin)
        delta = max(delta, float((maxmin - rows).max()))
    return delta


def euclidean_dismat(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Euclidean distance matrix in float64 (Gram-matrix form), exact zero diagonal. [N, D] -> [N, N]."""
    a = _as_float64_array(x)
    sq = np.einsum("ij,ij->i", a, a)
    d2 = sq[:, None] + sq[None, :] - 2 * (a @ a.T)
    d = np.sqrt(np.maximum(d2, 0.0))
    np.fill_diagonal(d, 0.0)
    return d


def batched_delta_hyp(
    x: np.ndarray | torch.Tensor, n_tries: int = 10, batch_size: int = 1500, seed: int | None = None
) -> list[tuple[float, float]]:
    """Relative delta on ``n_tries`` random subsets of the rows of ``x`` [N, D].

    Each try draws ``min(batch_size, N)`` distinct rows in random order (numpy ``default_rng(seed)``;
    the first drawn row is the base point), builds their Euclidean distance matrix and returns
    ``(delta_rel, diam)`` with ``delta_rel = 2 delta / diam``.
    """
    if n_tries < 1:
        raise ValueError(f"batched_delta_hyp: n_tries must be >= 1, got {n_tries}")
    a = _as_float64_array(x)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"batched_delta_hyp: expected [N >= 2, D] vectors, got shape {a.shape}")
    rng = np.random.default_rng(seed)
    size = min(batch_size, a.shape[0])
    results = []
    for _ in range(n_tries):
        dismat = euclidean_dismat(a[rng.choice(a.shape[0], size=size, replace=False)])
        diam = float(dismat.max())
        if diam == 0.0:
            raise ValueError("batched_delta_hyp: all sampled points coincide (diameter 0)")
        results.append((2 * delta_hyp(dismat) / diam, diam))
    return results


def curvature_from_delta_rel(delta_rel: float) -> float:
    """Ball curvature ``c = (0.144 / delta_rel)^2`` (Khrulkov et al. 2020).

    Raises ValueError for ``delta_rel <= TREE_LIKE_DELTA_REL`` (or not finite): a 0-hyperbolic
    (tree-like) sample, e.g. data reduced to one dimension, corresponds to an infinitely curved space,
    and no finite c would be right.
    """
    if not (math.isfinite(delta_rel) and delta_rel > TREE_LIKE_DELTA_REL):
        raise ValueError(
            f"relative delta-hyperbolicity is {delta_rel}: the sample is tree-like (0-hyperbolic), so the "
            "formula c = (0.144 / delta_rel)^2 gives no finite curvature; set the curvature explicitly, "
            "or estimate it from more samples / more PCA components"
        )
    return (POINCARE_DELTA_REL / delta_rel) ** 2


def estimate_curvature(
    x: np.ndarray | torch.Tensor,
    n_components: int = 100,
    n_tries: int = 3,
    n_samples: int = 1000,
    seed: int = 0,
) -> tuple[float, dict[str, Any]]:
    """Curvature suggested by the delta-hyperbolicity of the vectors ``x`` [N, D].

    1. PCA (scikit-learn, ``svd_solver='auto'``, ``random_state=seed``) to
       ``min(n_components, N, D)`` components.
    2. ``n_tries`` random subsets of ``min(n_samples, N)`` rows: relative delta (:func:`batched_delta_hyp`).
    3. ``c = (0.144 / delta_rel)^2`` per try; returns the mean over tries.

    Returns ``(c_mean, details)`` with details keys ``n_components`` (used), ``explained_variance``
    (fraction kept by the PCA), ``delta_rel``, ``diam`` and ``c`` (lists, one entry per try).
    Raises ValueError when a try is tree-like (see :func:`curvature_from_delta_rel`).
    """
    # imported here: scikit-learn takes ~0.8 s to import and only this function needs it
    from sklearn.decomposition import PCA

    data = _as_float64_array(x)
    if data.ndim != 2 or data.shape[0] < 2:
        raise ValueError(f"estimate_curvature: expected [N >= 2, D] vectors, got shape {data.shape}")
    k = max(1, min(n_components, *data.shape))
    pca = PCA(n_components=k, svd_solver="auto", random_state=seed)
    reduced = pca.fit_transform(data)
    tries = batched_delta_hyp(reduced, n_tries=n_tries, batch_size=n_samples, seed=seed)
    curvatures = [curvature_from_delta_rel(delta_rel) for delta_rel, _ in tries]
    details = {
        "n_components": k,
        "explained_variance": float(pca.explained_variance_ratio_.sum()),
        "delta_rel": [delta_rel for delta_rel, _ in tries],
        "diam": [diam for _, diam in tries],
        "c": curvatures,
    }
    return float(np.mean(curvatures)), details
