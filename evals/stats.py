"""Bootstrap confidence intervals: is a difference between two models more than noise?

Resampling is over examples (the unit that varies), paired when two models answered the same
examples, vectorised with numpy, and seeded so that a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
from numpy.typing import NDArray

Statistic = Callable[[NDArray[np.int64]], NDArray[np.float64]]  # resample indices (B, n) -> (B,)


class Resampling(TypedDict):
    resamples: int
    confidence: float
    seed: int


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def excludes(self, x: float = 0.0) -> bool:
        return self.low > x or self.high < x


def _interval(
    point: float, stat: Statistic, n: int, resamples: int, confidence: float, seed: int
) -> Interval:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    draws = stat(idx)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(point, float(low), float(high))


def mean_ci(
    values: list[float], *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of the mean."""
    if not values:
        raise ValueError("mean_ci needs at least one value")
    a = np.asarray(values, dtype=np.float64)
    return _interval(float(a.mean()), lambda idx: a[idx].mean(axis=1), len(a), resamples, confidence, seed)


def paired_diff_ci(
    candidate: list[float],
    baseline: list[float],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Interval of mean(candidate) - mean(baseline) over the same examples, resampled together."""
    if len(candidate) != len(baseline):
        raise ValueError("paired_diff_ci needs two equally long lists")
    diffs = [c - b for c, b in zip(candidate, baseline, strict=True)]
    return mean_ci(diffs, resamples=resamples, confidence=confidence, seed=seed)


def perplexity_ci(
    nll_sums: list[float],
    tokens: list[int],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Token-weighted perplexity exp(sum NLL / sum tokens), resampling examples."""
    s, t = np.asarray(nll_sums, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    point = float(np.exp(s.sum() / t.sum()))
    return _interval(
        point,
        lambda idx: np.exp(s[idx].sum(axis=1) / t[idx].sum(axis=1)),
        len(s),
        resamples,
        confidence,
        seed,
    )


def paired_perplexity_diff_ci(
    candidate: tuple[list[float], list[int]],
    baseline: tuple[list[float], list[int]],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Interval of perplexity(candidate) - perplexity(baseline) over the same examples."""
    cs, ct = (np.asarray(x, dtype=np.float64) for x in candidate)
    bs, bt = (np.asarray(x, dtype=np.float64) for x in baseline)
    point = float(np.exp(cs.sum() / ct.sum()) - np.exp(bs.sum() / bt.sum()))

    def stat(idx: NDArray[np.int64]) -> NDArray[np.float64]:
        return np.asarray(
            np.exp(cs[idx].sum(axis=1) / ct[idx].sum(axis=1))
            - np.exp(bs[idx].sum(axis=1) / bt[idx].sum(axis=1)),
            dtype=np.float64,
        )

    return _interval(point, stat, len(cs), resamples, confidence, seed)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
