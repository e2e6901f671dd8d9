"""Batch normalisation as in the lecture "Batch Norm at test time", in plain numpy.

Training, for one mini-batch of m examples (rows of ``z``), per hidden unit:

    mu      = 1/m * sum_i z_i
    sigma^2 = 1/m * sum_i (z_i - mu)^2          (biased: divide by m, as the lecture does)
    z_norm  = (z - mu) / sqrt(sigma^2 + eps)
    z_tilde = gamma * z_norm + beta

At test time one example arrives alone, so mu and sigma^2 come from estimates kept during
training instead of from the batch:

    v = beta_avg * v + (1 - beta_avg) * theta    (exponentially weighted "running" average)

Convention: ``beta_avg`` is the weight of the *old* value, as in the lecture, ONNX
BatchNormalization (``momentum`` 0.9) and Keras (``momentum`` 0.99). PyTorch's ``momentum`` is the
weight of the *new* batch (0.1 there equals beta_avg = 0.9 here), and PyTorch's ``running_var``
averages the *unbiased* batch variance (times m / (m - 1)) while it normalises with the biased
one. bnserve averages the biased sigma^2 that training normalises with; to compare with PyTorch,
convert at the edge: ``momentum_torch = 1 - beta_avg``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


@dataclass(frozen=True)
class BatchCache:
    """What the backward pass needs from the train-mode forward."""

    z_norm: Array
    inv_std: Array  # 1 / sqrt(sigma^2 + eps)
    gamma: Array


def batch_stats(z: Array) -> tuple[Array, Array]:
    """Per-unit mean and biased variance over the rows of ``z`` (the mini-batch)."""
    mu = z.mean(axis=0)
    var = ((z - mu) ** 2).mean(axis=0)
    return mu, var


def forward_train(
    z: Array, gamma: Array, beta: Array, eps: float
) -> tuple[Array, Array, Array, BatchCache]:
    """Train mode: normalise with this mini-batch's own mu and sigma^2.

    Returns ``(z_tilde, mu, sigma^2, cache)``; mu and sigma^2 feed the running averages.
    """
    mu, var = batch_stats(z)
    inv_std = 1.0 / np.sqrt(var + eps)
    z_norm = (z - mu) * inv_std
    z_tilde = gamma * z_norm + beta
    return z_tilde, mu, var, BatchCache(z_norm=z_norm, inv_std=inv_std, gamma=gamma)


def backward(dz_tilde: Array, cache: BatchCache) -> tuple[Array, Array, Array]:
    """Gradients of the loss w.r.t. ``z``, ``gamma`` and ``beta``, given dL/dz_tilde.

    mu and sigma^2 are functions of every row of the batch, so each z_i also reaches the loss
    through them; collecting the three paths gives the compact form

        dz = inv_std / m * (m * dz_norm - sum(dz_norm) - z_norm * sum(dz_norm * z_norm)),

    where dz_norm = dz_tilde * gamma and the sums run over the batch.
    """
    m = dz_tilde.shape[0]
    dgamma = (dz_tilde * cache.z_norm).sum(axis=0)
    dbeta = dz_tilde.sum(axis=0)
    dz_norm = dz_tilde * cache.gamma
    dz = (cache.inv_std / m) * (
        m * dz_norm - dz_norm.sum(axis=0) - cache.z_norm * (dz_norm * cache.z_norm).sum(axis=0)
    )
    return dz, dgamma, dbeta


def ewma_update(running: Array, theta: Array, beta_avg: float) -> Array:
    """One step of the exponentially weighted average: beta_avg * v + (1 - beta_avg) * theta."""
    return beta_avg * running + (1.0 - beta_avg) * theta


def forward_infer(
    z: Array, gamma: Array, beta: Array, mean: Array, var: Array, eps: float
) -> Array:
    """Inference mode: the same affine map for every example, whatever else is in the batch."""
    return gamma * (z - mean) / np.sqrt(var + eps) + beta


def fold_into_linear(
    w: Array,
    b: Array | None,
    gamma: Array,
    beta: Array,
    mean: Array,
    var: Array,
    eps: float,
) -> tuple[Array, Array]:
    """Fold inference-mode batch norm into the linear layer ``z = x @ w + b`` before it.

    With scale = gamma / sqrt(var + eps):  W' = W * scale,  b' = (b - mu) * scale + beta,
    so that ``x @ W' + b'`` equals ``forward_infer(x @ w + b, ...)``. A missing bias is zeros.
    ``w`` has shape (n_in, n_out): columns are units, so the scale multiplies columns.
    """
    if b is None:
        b = np.zeros(w.shape[1])
    scale = gamma / np.sqrt(var + eps)
    return w * scale, (b - mean) * scale + beta
