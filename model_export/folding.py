"""Folding an inference-mode batch norm into the linear operator next to it, as pure numpy.

Inference-mode batch norm is one affine map per channel (axis 1 of its input, ONNX's convention):

    BN(z) = gamma * (z - mu) / sqrt(sigma^2 + eps) + beta = s * z + t,
    s = gamma / sqrt(sigma^2 + eps),   t = beta - mu * s

so it can be absorbed exactly into a linear operator on either side of it:

    after   y = s * (W x + b) + t        = (s W) x + (s b + t)         scale W's output channels
    before  y = W (s * x + t) + b        = (W s) x + (W t + b)         scale W's input channels

The second one is exact only if the operator sees nothing but ``s * x + t``: a Conv that pads its
input adds zeros *after* the batch norm, and ``W (s * pad(x) + t)`` differs from
``W pad(s * x + t)`` at the borders, so the caller must not fold into a padded Conv.

Every function takes and returns float64 arrays; callers cast once, to the weight's own dtype.
Weight layouts are ONNX's: Conv W [M, C/group, k...], ConvTranspose W [C, M/group, k...], a
MatMul/Gemm weight as the [K, N] matrix that multiplies from the right.
"""

from __future__ import annotations

import numpy as np

from model_export.batchnorm import Array


def affine(gamma: Array, beta: Array, mean: Array, var: Array, eps: float) -> tuple[Array, Array]:
    """(s, t) with BN(z) = s * z + t per channel."""
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s


def _per_out(s: Array, ndim: int) -> Array:
    """s shaped to scale axis 0 of an ndim-dimensional weight."""
    return s.reshape((-1,) + (1,) * (ndim - 1))


def after_conv(w: Array, b: Array | None, s: Array, t: Array) -> tuple[Array, Array]:
    """Conv (any rank, groups, stride, dilation, padding) then BN; W's axis 0 is the output
    channel."""
    b0 = np.zeros(w.shape[0]) if b is None else b
    return w * _per_out(s, w.ndim), b0 * s + t


def after_conv_transpose(
    w: Array, b: Array | None, s: Array, t: Array, group: int
) -> tuple[Array, Array]:
    """ConvTranspose then BN. W is [C_in, M/group, k...]: input channel i belongs to group
    i // (C_in/group), and its column j produces output channel group * (M/group) + j."""
    c_in, m_per_group = w.shape[0], w.shape[1]
    m = m_per_group * group
    b0 = np.zeros(m) if b is None else b
    groups_of_inputs = np.arange(c_in) // (c_in // group)
    out_channel = groups_of_inputs[:, None] * m_per_group + np.arange(m_per_group)[None, :]
    scale = s[out_channel].reshape((c_in, m_per_group) + (1,) * (w.ndim - 2))
    return w * scale, b0 * s + t


def after_matmul(w: Array, b: Array | None, s: Array, t: Array) -> tuple[Array, Array]:
    """x @ W (+ b) then BN over the output features (the columns of W)."""
    b0 = np.zeros(w.shape[1]) if b is None else b
    return w * s[None, :], b0 * s + t


def before_matmul(w: Array, b: Array | None, s: Array, t: Array) -> tuple[Array, Array]:
    """BN over the input features, then x @ W (+ b): scale W's rows, the shift becomes t @ W."""
    b0 = np.zeros(w.shape[1]) if b is None else b
    return w * s[:, None], t @ w + b0


def before_conv(
    w: Array, b: Array | None, s: Array, t: Array, group: int
) -> tuple[Array, Array]:
    """BN, then a Conv that does not pad. W is [M, C/group, k...]: output channel m reads the
    input channels of its group, g(m) * (C/group) + c for c < C/group."""
    m, c_per_group = w.shape[0], w.shape[1]
    b0 = np.zeros(m) if b is None else b
    group_of_out = np.arange(m) // (m // group)
    in_channel = group_of_out[:, None] * c_per_group + np.arange(c_per_group)[None, :]
    kernel_axes = tuple(range(2, w.ndim))
    scale = s[in_channel].reshape((m, c_per_group) + (1,) * (w.ndim - 2))
    shift = (w.sum(axis=kernel_axes) * t[in_channel]).sum(axis=1)  # sum_c,k W[m, c, k] t[c]
    return w * scale, b0 + shift
