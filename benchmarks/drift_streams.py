"""The drift study's streams: rows of a data set replayed in a seeded random order (sampled with
replacement), and the simulated drifts applied to them from a chosen example on.

A stream is [length, n_features] raw feature values, float64; examples ``start`` and later are
drifted. Every scenario draws the same undrifted rows the same way, so "no drift" is what each
drifted stream would have been. Feature statistics (``mean``, ``std``) are the training
standardisation the model carries, so "+1 std" means one training standard deviation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]
IntArray = NDArray[np.int64]


@dataclass(frozen=True)
class Pool:
    """The rows a stream samples from (its "population")."""

    x: Array  # [n, n_features]
    y: IntArray  # [n] class index

    def bootstrap(self, size: int, rng: np.random.Generator) -> Pool:
        """``size`` rows drawn with replacement: a population of that size."""
        rows = rng.integers(self.x.shape[0], size=size)
        return Pool(self.x[rows], self.y[rows])


@dataclass(frozen=True)
class Stream:
    x: Array  # [length, n_features]
    start: int | None  # first drifted example; None: no drift
    features: tuple[int, ...]  # the features the drift touches directly (empty: all or none)


@dataclass(frozen=True)
class Context:
    mean: Array  # training mean per feature
    std: Array  # training std per feature
    positive: int  # the class whose share "class mix" raises


Make = Callable[[Pool, Context, int, int, np.random.Generator], Stream]


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str  # one line for the README
    make: Make


def _rows(pool: Pool, length: int, rng: np.random.Generator) -> IntArray:
    return rng.integers(pool.x.shape[0], size=length)


def _features(ctx: Context, k: int, rng: np.random.Generator) -> IntArray:
    return np.sort(rng.choice(ctx.mean.shape[0], size=k, replace=False))


def no_drift(pool: Pool, ctx: Context, length: int, start: int, rng: np.random.Generator
             ) -> Stream:
    return Stream(pool.x[_rows(pool, length, rng)], None, ())


def scaled(factor: float) -> Make:
    """One random feature read in other units (multiplied by ``factor``)."""
    def make(pool: Pool, ctx: Context, length: int, start: int, rng: np.random.Generator
             ) -> Stream:
        x = pool.x[_rows(pool, length, rng)]
        (f,) = _features(ctx, 1, rng)
        x[start:, f] *= factor
        return Stream(x, start, (int(f),))
    return make


def offset(k: int, stds: float) -> Make:
    """``k`` random features shifted by ``stds`` training standard deviations."""
    def make(pool: Pool, ctx: Context, length: int, start: int, rng: np.random.Generator
             ) -> Stream:
        x = pool.x[_rows(pool, length, rng)]
        fs = _features(ctx, k, rng)
        x[start:, fs] += stds * ctx.std[fs]
        return Stream(x, start, tuple(int(f) for f in fs))
    return make


def swapped(pool: Pool, ctx: Context, length: int, start: int, rng: np.random.Generator
            ) -> Stream:
    """Two random columns exchanged (a client sending them in the wrong order)."""
    x = pool.x[_rows(pool, length, rng)]
    a, b = _features(ctx, 2, rng)
    x[start:, [a, b]] = x[start:, [b, a]]
    return Stream(x, start, (int(a), int(b)))


def linear(stds: float) -> Make:
    """Every feature drifting linearly from +0 to +``stds`` training std over the drifted part."""
    def make(pool: Pool, ctx: Context, length: int, start: int, rng: np.random.Generator
             ) -> Stream:
        x = pool.x[_rows(pool, length, rng)]
        ramp = np.arange(1, length - start + 1, dtype=np.float64) / (length - start)
        x[start:] += stds * ramp[:, None] * ctx.std[None, :]
        return Stream(x, start, ())
    return make


def decorrelated(k: int) -> Make:
    """``k`` random features taken from another random row: each feature's distribution is
    unchanged, only its relation to the others is lost (a join on the wrong key)."""
    def make(pool: Pool, ctx: Context, length: int, start: int, rng: np.random.Generator
             ) -> Stream:
        x = pool.x[_rows(pool, length, rng)]
        fs = _features(ctx, k, rng)
        other = _rows(pool, length - start, rng)
        x[start:, fs] = pool.x[other][:, fs]
        return Stream(x, start, tuple(int(f) for f in fs))
    return make


def class_mix(share: float) -> Make:
    """The positive class's share of examples changed to ``share``; each class's inputs are
    drawn as before (a change of P(y) with P(x | y) unchanged: the input mixture moves)."""
    def make(pool: Pool, ctx: Context, length: int, start: int, rng: np.random.Generator
             ) -> Stream:
        idx = _rows(pool, length, rng)
        pos = np.flatnonzero(pool.y == ctx.positive)
        neg = np.flatnonzero(pool.y != ctx.positive)
        n = length - start
        is_pos = rng.random(n) < share
        idx[start:] = np.where(is_pos, pos[rng.integers(pos.size, size=n)],
                               neg[rng.integers(neg.size, size=n)])
        return Stream(pool.x[idx], start, ())
    return make


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("no drift", "rows replayed as they are", no_drift),
    Scenario("x10 units", "one random feature multiplied by 10 (other units)", scaled(10.0)),
    Scenario("offset +1 std", "3 random features + 1 training std", offset(3, 1.0)),
    Scenario("offset +0.5 std", "3 random features + 0.5 training std", offset(3, 0.5)),
    Scenario("swapped columns", "two random columns exchanged", swapped),
    Scenario("slow drift", "all features + 0 -> +1 training std, linearly over the drifted part",
             linear(1.0)),
    Scenario("decorrelated", "3 random features taken from another random row (marginals "
             "unchanged)", decorrelated(3)),
    Scenario("class mix", "the malignant share raised to 60% (37% in the data), each class's "
             "rows as before", class_mix(0.6)),
)
