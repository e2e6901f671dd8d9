"""Mini-batch training with Adam, the running averages, and the ``bnserve-train`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from model_export import batchnorm, checkpoint, data, mlp, outputs
from model_export.batchnorm import Array
from model_export.mlp import Estimator, Network

DEFAULT_CHECKPOINT = outputs.MODELS_DIR / "default.ckpt"


@dataclass(frozen=True)
class TrainConfig:
    hidden: tuple[int, ...] = (32, 16)
    epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    eps: float = 1e-5
    beta_avg: float = 0.9  # weight of the old value in the running average (see batchnorm.py)
    estimator: Estimator = "ewma"
    val_fraction: float = 0.2
    seed: int = 0


@dataclass
class Adam:
    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    t: int = 0
    m: dict[str, Array] = field(default_factory=dict)
    v: dict[str, Array] = field(default_factory=dict)

    def step(self, params: dict[str, Array], grads: dict[str, Array]) -> None:
        self.t += 1
        for k, g in grads.items():
            self.m[k] = self.b1 * self.m.get(k, np.zeros_like(g)) + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v.get(k, np.zeros_like(g)) + (1 - self.b2) * g * g
            m_hat = self.m[k] / (1 - self.b1**self.t)
            v_hat = self.v[k] / (1 - self.b2**self.t)
            params[k] = params[k] - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def accuracy(
    net: Network, x: Array, y: NDArray[np.int64], estimator: Estimator | None = None
) -> float:
    probs = mlp.forward_infer(net, x, net.layer_stats(estimator))
    return float((probs.argmax(axis=1) == y).mean())


@dataclass
class TrainResult:
    net: Network
    meta: dict[str, Any]
    x_train: Array
    y_train: NDArray[np.int64]
    x_val: Array
    y_val: NDArray[np.int64]


def train(ds: data.Dataset, cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    if cfg.batch_size < 2:
        raise data.DataError("batch size must be at least 2: a batch of one has no variance")
    rng = np.random.default_rng(cfg.seed)
    train_rows, val_rows = data.stratified_split(ds.y, cfg.val_fraction, rng)
    x_train, y_train = ds.x[train_rows], ds.y[train_rows]
    x_val, y_val = ds.x[val_rows], ds.y[val_rows]
    if x_train.shape[0] < cfg.batch_size:
        raise data.DataError(
            f"{x_train.shape[0]} training rows, fewer than one batch of {cfg.batch_size}"
        )
    mean, std = data.standardisation(x_train)
    net = mlp.init_network(
        len(ds.feature_names),
        list(cfg.hidden),
        len(ds.class_names),
        mean,
        std,
        rng,
        cfg.eps,
        cfg.beta_avg,
    )
    opt = Adam(lr=cfg.lr)
    history: list[dict[str, float]] = []
    n = x_train.shape[0]
    # Drop the last incomplete batch of each (reshuffled) epoch: a tiny batch gives noisy mu and
    # sigma^2 to both the gradient and the running averages.
    n_batches = n // cfg.batch_size
    for epoch in range(1, cfg.epochs + 1):
        order = rng.permutation(n)
        losses = []
        for b in range(n_batches):
            rows = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            loss, grads, fwd = mlp.loss_and_grads(net, x_train[rows], y_train[rows])
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss} at epoch {epoch}: lower the learning rate"
                )
            opt.step(net.params, grads)
            for l, (mu, var) in enumerate(zip(fwd.batch_mu, fwd.batch_var, strict=True)):
                for key, theta in (("running_mean", mu), ("running_var", var)):
                    net.stats[f"hidden.{l}.{key}"] = batchnorm.ewma_update(
                        net.stats[f"hidden.{l}.{key}"], theta, cfg.beta_avg
                    )
            losses.append(loss)
        row = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "train_accuracy": accuracy(net, x_train, y_train, "ewma"),
            "val_accuracy": accuracy(net, x_val, y_val, "ewma"),
        }
        history.append(row)
        log(
            f"epoch {epoch:3d}/{cfg.epochs}  loss {row['loss']:.4f}  "
            f"train_acc {row['train_accuracy']:.4f}  val_acc {row['val_accuracy']:.4f}"
        )

    # The lecture's alternative: run the whole training set through the final network.
    mlp.set_population_stats(net, mlp.population_stats(net, x_train))
    net.estimator = cfg.estimator
    figures = {
        "train_accuracy": accuracy(net, x_train, y_train),
        "val_accuracy": accuracy(net, x_val, y_val),
        "final_loss": history[-1]["loss"],
        "n_train": int(x_train.shape[0]),
        "n_val": int(x_val.shape[0]),
    }
    log(
        f"estimator {cfg.estimator}: train_acc {figures['train_accuracy']:.4f}  "
        f"val_acc {figures['val_accuracy']:.4f}"
    )
    meta = {
        "feature_names": list(ds.feature_names),
        "class_names": list(ds.class_names),
        "data_sha256": ds.sha256,
        "data_source": ds.source,
        "config": {**asdict(cfg), "hidden": list(cfg.hidden)},
        "figures": figures,
        "history": history,
        "averaging": (
            "running = beta_avg * running + (1 - beta_avg) * batch; beta_avg weights the old value "
            "(ONNX/Keras momentum convention; PyTorch momentum = 1 - beta_avg); the biased batch "
            "variance is averaged (PyTorch averages the unbiased one)"
        ),
    }
    return TrainResult(net, meta, x_train, y_train, x_val, y_val)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive layer widths, got {text!r}")
    return values


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", type=Path, help="CSV with a header row (default: the shipped breast-cancer data)"
    )
    p.add_argument(
        "--target", default=None, help="target column (default for the shipped data: diagnosis)"
    )
    p.add_argument(
        "--features", default=None, help="comma-separated feature columns (default: all others)"
    )


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--hidden", type=_int_list, default=d.hidden, help="hidden widths, e.g. 32,16")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--eps", type=float, default=d.eps, help="batch-norm epsilon")
    p.add_argument(
        "--beta-avg",
        type=float,
        default=d.beta_avg,
        help="running-average weight of the old value (PyTorch momentum = 1 - this)",
    )
    p.add_argument(
        "--estimator",
        choices=mlp.ESTIMATORS,
        default=d.estimator,
        help="where inference takes mu and sigma^2 from",
    )
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--seed", type=int, default=d.seed)


def load_data(args: argparse.Namespace) -> data.Dataset:
    features = [f.strip() for f in args.features.split(",")] if args.features else None
    if args.data is None:
        if args.target not in (None, data.DEFAULT_TARGET) or features is not None:
            raise data.DataError("--target/--features need --data")
        return data.load_default()
    if args.target is None:
        raise data.DataError("--data needs --target (the column holding the class)")
    return data.load_csv(args.data, args.target, features)


def config_from(args: argparse.Namespace) -> TrainConfig:
    if not 0.0 <= args.beta_avg < 1.0:
        raise data.DataError(f"--beta-avg must be in [0, 1), got {args.beta_avg}")
    if args.epochs < 1:
        raise data.DataError("--epochs must be at least 1")
    return TrainConfig(
        hidden=tuple(args.hidden),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        eps=args.eps,
        beta_avg=args.beta_avg,
        estimator=args.estimator,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bnserve-train", description=__doc__)
    add_data_args(p)
    add_train_args(p)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"checkpoint to write (default: models/<data file name>.ckpt with --data, else "
        f"{DEFAULT_CHECKPOINT})",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out even if it holds another model (by default an existing checkpoint "
        "is replaced only by a retrained one of the same data, features and classes)",
    )
    args = p.parse_args(argv)
    out: Path = args.out or (
        DEFAULT_CHECKPOINT if args.data is None else outputs.derived(args.data, ".ckpt")
    )
    try:
        ds = load_data(args)
        origin = outputs.Origin(ds.source, ds.feature_names, ds.class_names)
        if (refused := outputs.refusal(out, origin, "checkpoint", args.force)) is not None:
            raise data.DataError(refused)
        cfg = config_from(args)
        separated = "" if ds.delimiter == "," else f" ({ds.delimiter!r}-separated)"
        print(
            f"data: {ds.source}{separated}  {ds.x.shape[0]} rows x {ds.x.shape[1]} features, "
            f"classes {list(ds.class_names)}  sha256 {ds.sha256[:12]}"
        )
        result = train(ds, cfg)
    except (data.DataError, FloatingPointError) as e:
        print(f"bnserve-train: error: {e}", file=sys.stderr)
        return 2
    checkpoint.save(out, result.net, result.meta, result.x_val, result.y_val)
    print(f"checkpoint written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
