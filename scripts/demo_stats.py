"""The demo's downstream verdict: a paired bootstrap confidence interval of a method's topic-accuracy difference to
the baseline over fine-tuning seeds, and the verdict it supports.

Seed i fine-tunes every model with the same data order, so the per-seed differences d_i = method_i - baseline_i
are paired. The interval resamples the seeds with replacement (`n_resamples` times, generator seeded with `seed`)
and takes the percentiles of the mean resampled difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
MIN_SEEDS = 5
"""Fewer fine-tuning seeds than this make a weak verdict (the report says so); one seed measures no spread."""


def paired_bootstrap_ci(method: Sequence[float], baseline: Sequence[float], level: float = 0.95,
                        n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) at `level` of mean(method - baseline), both [n seeds]
    paired by index; ValueError for unpaired or empty inputs."""
    diff = np.asarray(method, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if len(method) != len(baseline) or diff.ndim != 1 or len(diff) == 0:
        raise ValueError(f"paired bootstrap needs two equally long, non-empty 1-D sequences; got {len(method)} "
                         f"and {len(baseline)} values")
    picks = np.random.default_rng(seed).integers(0, len(diff), size=(n_resamples, len(diff)))
    means = diff[picks].mean(axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def verdict(ci: tuple[float, float] | None, n_seeds: int, min_seeds: int = MIN_SEEDS) -> str:
    """'better' (interval above 0), 'worse' (below 0) or 'no difference at 95%'; 'not measured' with fewer than
    two seeds or no interval; a '(weak: n seeds)' suffix with fewer than `min_seeds`."""
    if ci is None or n_seeds < 2:
        return "not measured"
    low, high = ci
    word = "better" if low > 0 else "worse" if high < 0 else "no difference at 95%"
    return word if n_seeds >= min_seeds else f"{word} (weak: {n_seeds} seeds)"
