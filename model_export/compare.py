"""``bnserve-compare``: held-out accuracy by where inference takes mu and sigma^2 from.

(a) the running (exponentially weighted) averages kept during training,
(b) exact population statistics of the training set through the final network,
(c) the statistics of the test batch itself, at several batch sizes,
(d) a single example's own statistics: sigma^2 = 0 and z - mu = 0, so every example is mapped to
    beta and gets the same answer, whatever its features (the failure the lecture warns about).

For (c) and (d) the held-out set is cut into batches at random, many times, and each batch is run
through the network in train mode; the table gives mean and standard deviation over those cuts
and over training seeds. "Differs from (a)" counts held-out examples whose predicted class is not
the one (a) gives them: for (c), answers that depend on which other examples share the batch.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from model_export import data, mlp
from model_export.batchnorm import Array
from model_export.mlp import Network
from model_export.train import (
    TrainConfig,
    add_data_args,
    add_train_args,
    config_from,
    load_data,
    train,
)


@dataclass(frozen=True)
class Row:
    label: str
    batch: str
    accuracies: list[float]
    differs: list[float]  # share of examples whose class differs from (a)


def batch_stat_predictions(
    net: Network, x: Array, batch_size: int, rng: np.random.Generator
) -> NDArray[np.int64]:
    """Predicted class of every row when each random batch is normalised with its own statistics."""
    pred = np.empty(x.shape[0], dtype=np.int64)
    order = rng.permutation(x.shape[0])
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        pred[rows] = mlp.forward_train(net, x[rows]).logits.argmax(axis=1)
    return pred


def compare(
    ds: data.Dataset, cfg: TrainConfig, seeds: list[int], batch_sizes: list[int], cuts: int
) -> tuple[list[Row], int]:
    """The table's rows, and the size of the held-out set."""
    rows: dict[str, Row] = {}

    def add(label: str, batch: str, acc: float, differs: float) -> None:
        row = rows.setdefault(label + batch, Row(label, batch, [], []))
        row.accuracies.append(acc)
        row.differs.append(differs)

    for seed in seeds:
        res = train(ds, replace(cfg, seed=seed), log=lambda _: None)
        net, x, y = res.net, res.x_val, res.y_val
        ref = mlp.forward_infer(net, x, net.layer_stats("ewma")).argmax(axis=1)
        pop = mlp.forward_infer(net, x, net.layer_stats("population")).argmax(axis=1)
        add(f"(a) running averages (ewma, beta_avg {cfg.beta_avg})", "any", _acc(ref, y), 0.0)
        add("(b) population statistics", "any", _acc(pop, y), _share(pop != ref))
        rng = np.random.default_rng(seed)
        for bs in [*sorted({min(b, x.shape[0]) for b in batch_sizes}, reverse=True), 1]:
            label = (
                "(d) the example's own statistics" if bs == 1 else "(c) the test batch's statistics"
            )
            for _ in range(cuts if bs < x.shape[0] else 1):
                pred = batch_stat_predictions(net, x, bs, rng)
                add(
                    label,
                    f"{bs}" if bs < x.shape[0] else f"{bs} (all)",
                    _acc(pred, y),
                    _share(pred != ref),
                )
    return list(rows.values()), int(x.shape[0])


def _acc(pred: NDArray[np.int64], y: NDArray[np.int64]) -> float:
    return float((pred == y).mean())


def _share(mask: NDArray[np.bool_]) -> float:
    return float(mask.mean())


def format_table(rows: list[Row], n_val: int, seeds: list[int], cuts: int) -> str:
    lines = [
        f"held-out set: {n_val} examples; training seeds {seeds}; batch cuts per seed: {cuts}",
        "",
        "| mu and sigma^2 at test time from | batch size | held-out accuracy | differs from (a) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        acc, dif = np.array(r.accuracies), np.array(r.differs)
        lines.append(
            f"| {r.label} | {r.batch} | {acc.mean():.3f} ± {acc.std():.3f} | {dif.mean():.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bnserve-compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_args(p)
    add_train_args(p)
    p.add_argument("--seeds", default="0,1,2,3,4", help="training seeds, comma-separated")
    p.add_argument(
        "--batch-sizes",
        default="2,4,8,16,32,all",
        help="test batch sizes for (c); all = the whole held-out set",
    )
    p.add_argument("--cuts", type=int, default=20, help="random batch cuts per seed for (c), (d)")
    args = p.parse_args(argv)
    try:
        ds = load_data(args)
        cfg = config_from(args)
        seeds = [int(s) for s in args.seeds.split(",")]
        sizes = [sys.maxsize if s == "all" else int(s) for s in args.batch_sizes.split(",")]
        if min(sizes) < 2:
            raise data.DataError("--batch-sizes must be >= 2; batch size 1 is row (d)")
        rows, n_val = compare(ds, cfg, seeds, sizes, args.cuts)
    except (data.DataError, ValueError) as e:
        print(f"bnserve-compare: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, n_val, seeds, args.cuts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
