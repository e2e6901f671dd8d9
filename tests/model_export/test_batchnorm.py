"""The lecture's equations against independent references: finite differences and closed forms."""

from __future__ import annotations

import numpy as np

from model_export import batchnorm


def _numeric_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Central differences of the scalar f() with respect to every entry of x (changed in place)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        up = f()
        x[i] = old - h
        down = f()
        x[i] = old
        g[i] = (up - down) / (2 * h)
    return g


def test_train_forward_normalises_with_the_batch_mean_and_biased_variance() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(3.0, 2.0, (16, 5))
    gamma, beta = rng.uniform(0.5, 2, 5), rng.normal(size=5)
    out, mu, var, cache = batchnorm.forward_train(z, gamma, beta, eps=1e-5)
    np.testing.assert_allclose(mu, np.mean(z, axis=0), rtol=1e-12)
    np.testing.assert_allclose(var, np.var(z, axis=0, ddof=0), rtol=1e-12)
    np.testing.assert_allclose(cache.z_norm.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(out, gamma * (z - mu) / np.sqrt(var + 1e-5) + beta, rtol=1e-12)


def test_backward_matches_finite_differences() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(8, 4))
    gamma, beta = rng.uniform(0.5, 2, 4), rng.normal(size=4)
    upstream = rng.normal(size=(8, 4))  # loss = sum(upstream * z_tilde), so dL/dz_tilde = upstream

    def loss() -> float:
        return float((upstream * batchnorm.forward_train(z, gamma, beta, 1e-5)[0]).sum())

    _, _, _, cache = batchnorm.forward_train(z, gamma, beta, 1e-5)
    dz, dgamma, dbeta = batchnorm.backward(upstream, cache)
    # central differences in float64: truncation ~h^2, rounding ~1e-16/h, so 1e-7 is ample
    np.testing.assert_allclose(dz, _numeric_grad(loss, z), atol=1e-7)
    np.testing.assert_allclose(dgamma, _numeric_grad(loss, gamma), atol=1e-7)
    np.testing.assert_allclose(dbeta, _numeric_grad(loss, beta), atol=1e-7)


def test_running_average_matches_its_closed_form() -> None:
    # v_k = beta^k v_0 + (1 - beta) * sum_i beta^(k - i) theta_i
    rng = np.random.default_rng(2)
    thetas = rng.normal(size=(50, 3))
    beta_avg, v0 = 0.9, np.ones(3)
    v = v0.copy()
    for theta in thetas:
        v = batchnorm.ewma_update(v, theta, beta_avg)
    k = len(thetas)
    weights = (1 - beta_avg) * beta_avg ** (k - 1 - np.arange(k))
    np.testing.assert_allclose(v, beta_avg**k * v0 + weights @ thetas, rtol=1e-12)


def test_fold_into_linear_equals_linear_then_inference_batchnorm() -> None:
    rng = np.random.default_rng(3)
    x, w, b = rng.normal(size=(10, 6)), rng.normal(size=(6, 4)), rng.normal(size=4)
    gamma, beta = rng.uniform(0.5, 2, 4), rng.normal(size=4)
    mean, var = rng.normal(size=4), rng.uniform(0.1, 3, 4)
    expected = batchnorm.forward_infer(x @ w + b, gamma, beta, mean, var, 1e-3)
    for bias in (b, None):
        w2, b2 = batchnorm.fold_into_linear(w, bias, gamma, beta, mean, var, 1e-3)
        ref = expected if bias is not None else expected - gamma * b / np.sqrt(var + 1e-3)
        np.testing.assert_allclose(x @ w2 + b2, ref, rtol=1e-12, atol=1e-12)


def test_a_single_examples_own_statistics_map_every_input_to_beta() -> None:
    """The failure the lecture warns about: one example has sigma^2 = 0 and z - mu = 0."""
    rng = np.random.default_rng(4)
    gamma, beta = rng.uniform(0.5, 2, 3), rng.normal(size=3)
    for _ in range(5):
        out, _, var, _ = batchnorm.forward_train(rng.normal(size=(1, 3)) * 100, gamma, beta, 1e-5)
        np.testing.assert_array_equal(var, 0.0)
        np.testing.assert_array_equal(out[0], beta)
