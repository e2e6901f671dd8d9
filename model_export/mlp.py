"""The network: standardise -> [Linear -> BatchNorm -> ReLU] x L -> Linear -> softmax.

Parameters live in one flat dict of named arrays (the names are what the checkpoint stores):

    hidden.{l}.weight   (n_in, n_out)  the Linear; it has no bias, because batch norm subtracts the
                                       batch mean right after it, which cancels any bias, and beta
                                       then supplies the shift a bias would have given
    hidden.{l}.gamma    (n_out,)       batch-norm scale
    hidden.{l}.beta     (n_out,)       batch-norm shift
    output.weight       (n_last, n_classes)
    output.bias         (n_classes,)

Statistics (not trained by gradient descent) live in a second dict:

    input.mean, input.std                        training-set standardisation of raw features
    hidden.{l}.running_mean, hidden.{l}.running_var    exponentially weighted averages (ewma)
    hidden.{l}.population_mean, hidden.{l}.population_var    exact statistics over the training set
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from model_export import batchnorm
from model_export.batchnorm import Array, BatchCache

IntArray = NDArray[np.int64]
Estimator = Literal["ewma", "population"]
ESTIMATORS: tuple[Estimator, ...] = ("ewma", "population")
_STAT_KEYS: dict[Estimator, tuple[str, str]] = {
    "ewma": ("running_mean", "running_var"),
    "population": ("population_mean", "population_var"),
}


@dataclass
class Network:
    params: dict[str, Array]
    stats: dict[str, Array]
    eps: float = 1e-5
    beta_avg: float = 0.9
    estimator: Estimator = "ewma"

    @property
    def n_hidden(self) -> int:
        return sum(1 for k in self.params if k.endswith(".gamma"))

    @property
    def n_features(self) -> int:
        return int(self.stats["input.mean"].shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.params["output.bias"].shape[0])

    def standardise(self, x: Array) -> Array:
        return (x - self.stats["input.mean"]) / self.stats["input.std"]

    def layer_stats(self, estimator: Estimator | None = None) -> list[tuple[Array, Array]]:
        """Per hidden layer, the (mu, sigma^2) that inference uses under ``estimator``."""
        mean_key, var_key = _STAT_KEYS[estimator or self.estimator]
        return [
            (self.stats[f"hidden.{l}.{mean_key}"], self.stats[f"hidden.{l}.{var_key}"])
            for l in range(self.n_hidden)
        ]


def init_network(
    n_features: int,
    hidden: list[int],
    n_classes: int,
    input_mean: Array,
    input_std: Array,
    rng: np.random.Generator,
    eps: float = 1e-5,
    beta_avg: float = 0.9,
) -> Network:
    """He-initialised weights, gamma = 1, beta = 0; running averages start at mu = 0,
    sigma^2 = 1 (as PyTorch and Keras do; after a few hundred updates the start is forgotten)."""
    params: dict[str, Array] = {}
    stats: dict[str, Array] = {"input.mean": input_mean, "input.std": input_std}
    n_in = n_features
    for l, n_out in enumerate(hidden):
        params[f"hidden.{l}.weight"] = rng.normal(0.0, np.sqrt(2.0 / n_in), (n_in, n_out))
        params[f"hidden.{l}.gamma"] = np.ones(n_out)
        params[f"hidden.{l}.beta"] = np.zeros(n_out)
        stats[f"hidden.{l}.running_mean"] = np.zeros(n_out)
        stats[f"hidden.{l}.running_var"] = np.ones(n_out)
        n_in = n_out
    params["output.weight"] = rng.normal(0.0, np.sqrt(1.0 / n_in), (n_in, n_classes))
    params["output.bias"] = np.zeros(n_classes)
    return Network(params=params, stats=stats, eps=eps, beta_avg=beta_avg)


def softmax(logits: Array) -> Array:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    probs: Array = e / e.sum(axis=1, keepdims=True)
    return probs


@dataclass
class TrainForward:
    """The train-mode forward pass: logits plus what backward and the running averages need."""

    logits: Array
    inputs: list[Array] = field(
        default_factory=list
    )  # a_{l-1} for each hidden layer, then the last
    caches: list[BatchCache] = field(default_factory=list)
    relu_masks: list[NDArray[np.bool_]] = field(default_factory=list)
    batch_mu: list[Array] = field(default_factory=list)
    batch_var: list[Array] = field(default_factory=list)


def forward_train(net: Network, x: Array) -> TrainForward:
    """Every batch-norm layer normalises with the statistics of this batch (the lecture's
    training equations). Used by training, and to show what batch statistics do at test time."""
    p = net.params
    a = net.standardise(x)
    out = TrainForward(logits=a)
    for l in range(net.n_hidden):
        out.inputs.append(a)
        z = a @ p[f"hidden.{l}.weight"]
        z_tilde, mu, var, cache = batchnorm.forward_train(
            z, p[f"hidden.{l}.gamma"], p[f"hidden.{l}.beta"], net.eps
        )
        mask = z_tilde > 0
        a = z_tilde * mask
        out.caches.append(cache)
        out.relu_masks.append(mask)
        out.batch_mu.append(mu)
        out.batch_var.append(var)
    out.inputs.append(a)
    out.logits = a @ p["output.weight"] + p["output.bias"]
    return out


def loss_and_grads(
    net: Network, x: Array, y: IntArray
) -> tuple[float, dict[str, Array], TrainForward]:
    """Mean softmax cross-entropy of a mini-batch, and its gradient for every parameter."""
    fwd = forward_train(net, x)
    m = x.shape[0]
    probs = softmax(fwd.logits)
    loss = float(-np.log(probs[np.arange(m), y] + 1e-300).mean())

    p = net.params
    grads: dict[str, Array] = {}
    dlogits = probs.copy()
    dlogits[np.arange(m), y] -= 1.0
    dlogits /= m
    grads["output.weight"] = fwd.inputs[-1].T @ dlogits
    grads["output.bias"] = dlogits.sum(axis=0)
    da = dlogits @ p["output.weight"].T
    for l in reversed(range(net.n_hidden)):
        dz_tilde = da * fwd.relu_masks[l]
        dz, dgamma, dbeta = batchnorm.backward(dz_tilde, fwd.caches[l])
        grads[f"hidden.{l}.gamma"] = dgamma
        grads[f"hidden.{l}.beta"] = dbeta
        grads[f"hidden.{l}.weight"] = fwd.inputs[l].T @ dz
        da = dz @ p[f"hidden.{l}.weight"].T
    return loss, grads, fwd


def forward_infer(net: Network, x: Array, stats: list[tuple[Array, Array]] | None = None) -> Array:
    """Inference mode: class probabilities with fixed per-layer (mu, sigma^2), by default the
    network's chosen estimator. Each row's answer depends on that row alone."""
    p = net.params
    a = net.standardise(x)
    for l, (mean, var) in enumerate(stats if stats is not None else net.layer_stats()):
        z = a @ p[f"hidden.{l}.weight"]
        z_tilde = batchnorm.forward_infer(
            z, p[f"hidden.{l}.gamma"], p[f"hidden.{l}.beta"], mean, var, net.eps
        )
        a = np.maximum(z_tilde, 0.0)
    return softmax(a @ p["output.weight"] + p["output.bias"])


def population_stats(net: Network, x: Array) -> list[tuple[Array, Array]]:
    """Exact mu and sigma^2 (biased) of every batch-norm layer over the whole of ``x``.

    Layer by layer: layer l's statistics are taken on activations produced by layers 0..l-1
    already in inference mode with their own population statistics, which is exactly how
    inference will feed layer l.
    """
    p = net.params
    a = net.standardise(x)
    out: list[tuple[Array, Array]] = []
    for l in range(net.n_hidden):
        z = a @ p[f"hidden.{l}.weight"]
        mean, var = batchnorm.batch_stats(z)
        out.append((mean, var))
        z_tilde = batchnorm.forward_infer(
            z, p[f"hidden.{l}.gamma"], p[f"hidden.{l}.beta"], mean, var, net.eps
        )
        a = np.maximum(z_tilde, 0.0)
    return out


def set_population_stats(net: Network, stats: list[tuple[Array, Array]]) -> None:
    for l, (mean, var) in enumerate(stats):
        net.stats[f"hidden.{l}.population_mean"] = mean
        net.stats[f"hidden.{l}.population_var"] = var
