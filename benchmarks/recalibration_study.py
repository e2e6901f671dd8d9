"""Recalibration study (issue 13): held-out accuracy before and after ``bnserve-recalibrate`` on
simulated population shifts of the shipped data. ``make recalibration-study``; seeded, prints
markdown.

Per seed: the default network is trained (bnserve-train's defaults, seed s, its 80/20 split);
the shift is drawn; the new population's unlabeled inputs are the SHIFTED TRAINING rows (never
the held-out rows, which only score). Columns:

  (a) the original model on the original held-out rows
  (b) the original model on the shifted held-out rows
  (c) recalibrated, batch-norm layers only (``mlp.population_stats`` on the new rows)
  (d) recalibrated with --standardisation (input mean/std re-estimated too)
  (e) retrained from scratch on the shifted LABELED training rows: a ceiling

The recalibration is ``recalibrate.recalibrate_network``, the function ``bnserve-recalibrate``
runs before export; scoring uses the numpy inference forward that export verifies the ONNX file
against (within 1e-5 on probabilities).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
from numpy.typing import NDArray

from model_export import data, mlp, recalibrate
from model_export.batchnorm import Array
from model_export.train import TrainConfig, TrainResult, accuracy, train

SEEDS = (0, 1, 2, 3, 4)
K = 10  # features shifted by the affine scenarios
ROWS = (8, 16, 32, 64, 128, 256)  # new rows used, for the table of accuracy vs rows
DRAWS = 5  # random subsets per seed and row count
# label-frequency scenario: share of class 1 (M) in the new population (0.37 in the data)
MALIGNANT = 0.8

Shift = Callable[[Array], Array]


def _affine(rng: np.random.Generator, x_ref: Array, k: int, offset_only: bool = False) -> Shift:
    """x' = a x + b on k features: a in [0.5, 2], b = +-1 training std (a = 1 if offset_only)."""
    cols = rng.choice(x_ref.shape[1], size=k, replace=False)
    a = np.ones(x_ref.shape[1])
    b = np.zeros(x_ref.shape[1])
    a[cols] = 1.0 if offset_only else rng.uniform(0.5, 2.0, k)
    b[cols] = rng.choice([-1.0, 1.0], k) * x_ref[:, cols].std(axis=0)
    return lambda x: a * x + b


def _units(rng: np.random.Generator, x_ref: Array) -> Shift:
    col = int(rng.integers(x_ref.shape[1]))
    scale = np.ones(x_ref.shape[1])
    scale[col] = 10.0
    return lambda x: x * scale


def _swap(rng: np.random.Generator, x_ref: Array) -> Shift:
    i, j = rng.choice(x_ref.shape[1], size=2, replace=False)
    order = np.arange(x_ref.shape[1])
    order[[i, j]] = order[[j, i]]
    return lambda x: x[:, order]


def _sign(rng: np.random.Generator, x_ref: Array) -> Shift:
    sign = np.ones(x_ref.shape[1])
    sign[rng.choice(x_ref.shape[1], size=K, replace=False)] = -1.0
    return lambda x: x * sign


# name -> how the shift is drawn (None: inputs unchanged, label frequencies changed)
SCENARIOS: dict[str, Callable[[np.random.Generator, Array], Shift] | None] = {
    "no shift": lambda rng, x: lambda v: v,
    f"affine, {K} features (a in [0.5, 2], b = +-1 sd)": lambda rng, x: _affine(rng, x, K),
    "affine, all 30 features": lambda rng, x: _affine(rng, x, x.shape[1]),
    "offset +-1 sd, 5 features": lambda rng, x: _affine(rng, x, 5, offset_only=True),
    "one feature x10 (units)": _units,
    "two columns swapped": _swap,
    f"sign flip, {K} features": _sign,
    f"label frequency {MALIGNANT:.0%} M, inputs unchanged": None,
}


def _resample(y: NDArray[np.int64], share: float, rng: np.random.Generator) -> NDArray[np.int64]:
    """Row indices (with replacement, as many as y) with ``share`` of them of class 1."""
    n1 = round(len(y) * share)
    ones, zeros = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    return np.concatenate([rng.choice(ones, n1), rng.choice(zeros, len(y) - n1)])


def _retrain(x: Array, y: NDArray[np.int64], cfg: TrainConfig, ds: data.Dataset) -> mlp.Network:
    """Trained from scratch on labeled rows of the new population. train() splits off its own
    validation rows: given the whole shifted data set in the original row order, that split is
    the original one (it depends on the labels and the seed only), so the held-out rows stay
    unseen; given resampled training rows (label-frequency case), it trains on 80 % of them."""
    shifted = replace(ds, x=x, y=y)
    return train(shifted, cfg, log=lambda _: None).net


def scenario_row(
    name: str, results: dict[int, TrainResult], ds: data.Dataset
) -> list[float | None]:
    """Mean accuracies (a)..(e) over the seeds, and their standard deviations."""
    draw = SCENARIOS[name]
    scores: list[list[float]] = []
    for seed, res in results.items():
        rng = np.random.default_rng([seed, list(SCENARIOS).index(name)])
        net, cfg = res.net, TrainConfig(seed=seed)
        if draw is None:
            tr, va = _resample(res.y_train, MALIGNANT, rng), _resample(res.y_val, MALIGNANT, rng)
            x_new, y_new = res.x_train[tr], res.y_train[tr]
            x_held, y_held = res.x_val[va], res.y_val[va]
            ceiling = _retrain(x_new, y_new, cfg, ds)
        else:
            shift = draw(rng, res.x_train)
            x_new, x_held, y_held = shift(res.x_train), shift(res.x_val), res.y_val
            ceiling = _retrain(shift(ds.x), ds.y, cfg, ds)
        scores.append([
            accuracy(net, res.x_val, res.y_val),
            accuracy(net, x_held, y_held),
            accuracy(recalibrate.recalibrate_network(net, x_new), x_held, y_held),
            accuracy(recalibrate.recalibrate_network(net, x_new, True), x_held, y_held),
            accuracy(ceiling, x_held, y_held),
        ])
    s = np.array(scores)
    return [*s.mean(axis=0), *s.std(axis=0)]


def rows_table(results: dict[int, TrainResult]) -> list[tuple[str, float, float, float]]:
    """Accuracy of (c) and (d) vs the number of new rows recalibrated on, affine K scenario."""
    name = f"affine, {K} features (a in [0.5, 2], b = +-1 sd)"
    draw = SCENARIOS[name]
    assert draw is not None
    out: list[tuple[str, float, float, float]] = []
    counts: list[int | None] = [*ROWS, None]
    for n in counts:
        bn, both, before = [], [], []
        for seed, res in results.items():
            shift = draw(np.random.default_rng([seed, list(SCENARIOS).index(name)]), res.x_train)
            x_new, x_held = shift(res.x_train), shift(res.x_val)
            before.append(accuracy(res.net, x_held, res.y_val))
            rng = np.random.default_rng([seed, 99, n or 0])
            for _ in range(DRAWS if n is not None else 1):
                rows = x_new if n is None else x_new[rng.choice(len(x_new), n, replace=False)]
                bn.append(accuracy(recalibrate.recalibrate_network(res.net, rows),
                                   x_held, res.y_val))
                both.append(accuracy(recalibrate.recalibrate_network(res.net, rows, True),
                                     x_held, res.y_val))
        label = f"all ({len(next(iter(results.values())).x_train)})" if n is None else str(n)
        out.append((label, float(np.mean(before)), float(np.mean(bn)), float(np.mean(both))))
    return out


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="recalibration_study", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    t0 = time.perf_counter()
    ds = data.load_default()
    results = {s: train(ds, TrainConfig(seed=s), log=lambda _: None) for s in SEEDS}
    n_val = len(results[SEEDS[0]].x_val)
    print(f"Shipped data (569 x 30), default network and training (hidden 32,16, 40 epochs, "
          f"estimator ewma), seeds {', '.join(map(str, SEEDS))}; held-out = each seed's "
          f"{n_val} validation rows. Mean accuracy over the seeds (sd over the seeds).\n")
    print("| shift | (a) original, original rows | (b) original, shifted rows | "
          "(c) recalibrated BN | (d) recalibrated BN + standardisation | (e) retrained (ceiling) |")
    print("|---|---|---|---|---|---|")
    for name in SCENARIOS:
        row = scenario_row(name, results, ds)
        cells = [f"{m:.3f} ({s:.3f})" for m, s in zip(row[:5], row[5:], strict=True)]
        print(f"| {name} | {' | '.join(cells)} |")
    print(f"\nAccuracy vs the number of new (shifted, unlabeled) training rows recalibrated on; "
          f"affine shift of {K} features; mean over {len(SEEDS)} seeds x {DRAWS} random "
          "subsets.\n")
    print("| new rows | (b) original | (c) recalibrated BN | (d) BN + standardisation |")
    print("|---|---|---|---|")
    for label, before, bn, both in rows_table(results):
        print(f"| {label} | {before:.3f} | {bn:.3f} | {both:.3f} |")
    print(f"\n(took {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
