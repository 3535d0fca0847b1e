"""Gromov delta-hyperbolicity: tree and cycle metrics, brute force, curvature estimation."""

import itertools

import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import shortest_path

from hyptorch.delta import (
    POINCARE_DELTA_REL,
    batched_delta_hyp,
    curvature_from_delta_rel,
    delta_hyp,
    estimate_curvature,
)


def _graph_metric(n: int, weighted_edges: list[tuple[int, int, float]]) -> np.ndarray:
    adj = np.zeros((n, n))
    for i, j, w in weighted_edges:
        adj[i, j] = adj[j, i] = w
    return shortest_path(adj, directed=False)


def _brute_force_delta(d: np.ndarray) -> float:
    """Four-point condition with base point 0, by explicit loops over all (x, y, z)."""
    n = d.shape[0]

    def gromov(x: int, y: int) -> float:
        return (d[0, x] + d[0, y] - d[x, y]) / 2

    best = 0.0
    for x, y, z in itertools.product(range(n), repeat=3):
        best = max(best, min(gromov(x, z), gromov(z, y)) - gromov(x, y))
    return best


def test_tree_metric_has_zero_delta():
    # a weighted tree: root 0 with branches, depth 3, 10 nodes
    edges = [
        (0, 1, 1.0),
        (0, 2, 2.5),
        (1, 3, 0.7),
        (1, 4, 1.3),
        (2, 5, 0.4),
        (2, 6, 3.0),
        (6, 7, 1.1),
        (6, 8, 0.2),
        (3, 9, 2.0),
    ]
    d = _graph_metric(10, edges)
    assert delta_hyp(d) == pytest.approx(0.0, abs=1e-12)
    # any base point: permute so that a leaf comes first
    perm = np.array([9, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    assert delta_hyp(d[np.ix_(perm, perm)]) == pytest.approx(0.0, abs=1e-12)


def test_square_closed_form():
    # C_4 with unit edges, base point 0: (1|3) = 0, (1|2) = (2|3) = 1, so delta = min(1, 1) - 0 = 1
    d = _graph_metric(4, [(0, 1, 1.0), (1, 2, 1.0), (2, 3, 1.0), (3, 0, 1.0)])
    assert delta_hyp(d) == pytest.approx(1.0)


@pytest.mark.parametrize("n", [5, 8, 12])
def test_cycle_graph_is_not_a_tree(n):
    d = _graph_metric(n, [(i, (i + 1) % n, 1.0) for i in range(n)])
    delta = delta_hyp(d)
    assert delta > 0
    assert delta == pytest.approx(_brute_force_delta(d))


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_on_random_points(seed):
    rng = np.random.default_rng(seed)
    pts = rng.normal(size=(11, 3))
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    expected = _brute_force_delta(d)
    assert delta_hyp(d) == pytest.approx(expected, rel=1e-12)
    assert delta_hyp(torch.from_numpy(d).float()) == pytest.approx(expected, rel=1e-5)
    # blocking does not change the result
    assert delta_hyp(d, block_size=1) == pytest.approx(expected, rel=1e-12)
    assert delta_hyp(d, block_size=4) == pytest.approx(expected, rel=1e-12)


def test_input_validation():
    with pytest.raises(ValueError, match="square"):
        delta_hyp(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        delta_hyp(np.full((3, 3), np.inf))
    assert delta_hyp(np.zeros((1, 1))) == 0.0


def test_batched_delta_hyp():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    tries = batched_delta_hyp(x, n_tries=3, batch_size=25, seed=1)
    assert len(tries) == 3
    for delta_rel, diam in tries:
        assert 0 < delta_rel <= 1 and diam > 0
    assert tries == batched_delta_hyp(x, n_tries=3, batch_size=25, seed=1)
    # a batch covering all rows, with the rows in their original order, is the plain computation
    full = batched_delta_hyp(x[:8], n_tries=1, batch_size=100, seed=0)[0]
    perm = np.random.default_rng(0).choice(8, size=8, replace=False)
    d = np.linalg.norm(x[perm][:, None] - x[perm][None], axis=-1)
    assert full[0] == pytest.approx(2 * delta_hyp(d) / d.max())
    assert full[1] == pytest.approx(d.max())
    with pytest.raises(ValueError, match="coincide"):
        batched_delta_hyp(np.ones((5, 2)), n_tries=1)


def test_curvature_formula():
    assert curvature_from_delta_rel(POINCARE_DELTA_REL) == pytest.approx(1.0)
    assert curvature_from_delta_rel(0.072) == pytest.approx(4.0)
    assert curvature_from_delta_rel(0.288) == pytest.approx(0.25)
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="tree-like"):
            curvature_from_delta_rel(bad)


def test_estimate_curvature_on_gaussian_data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 40))
    c, details = estimate_curvature(x, n_components=10, n_tries=2, n_samples=120, seed=5)
    assert np.isfinite(c) and c > 0
    assert details["n_components"] == 10
    assert 0 < details["explained_variance"] <= 1
    assert len(details["delta_rel"]) == len(details["diam"]) == len(details["c"]) == 2
    assert c == pytest.approx(np.mean([curvature_from_delta_rel(r) for r in details["delta_rel"]]))
    assert estimate_curvature(x, n_components=10, n_tries=2, n_samples=120, seed=5) == (c, details)
    from_tensor, _ = estimate_curvature(
        torch.from_numpy(x), n_components=10, n_tries=2, n_samples=120, seed=5
    )
    assert from_tensor == pytest.approx(c, rel=1e-9)
    other_seed, _ = estimate_curvature(x, n_components=10, n_tries=2, n_samples=120, seed=6)
    assert other_seed != c
    # components clamped to what the data allows
    _, small = estimate_curvature(x[:30, :6], n_components=100, n_tries=1, n_samples=30, seed=0)
    assert small["n_components"] == 6


def test_estimate_curvature_tree_like_data_raises():
    # one component: points on a line form a tree (delta = 0)
    x = np.random.default_rng(0).normal(size=(50, 4))
    with pytest.raises(ValueError, match="tree-like"):
        estimate_curvature(x, n_components=1, n_tries=1, n_samples=50)
