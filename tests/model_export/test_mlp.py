"""The whole network: gradients by finite differences, population statistics computed directly."""

from __future__ import annotations

import numpy as np

from model_export import mlp
from model_export.train import TrainResult


def test_network_gradients_match_finite_differences(small_net: mlp.Network) -> None:
    rng = np.random.default_rng(11)
    x = rng.normal(size=(9, 6)) * 2 + 1
    y = rng.integers(0, 3, 9)
    _, grads, _ = mlp.loss_and_grads(small_net, x, y)
    h = 1e-6
    for name, param in small_net.params.items():
        numeric = np.zeros_like(param)
        for i in np.ndindex(param.shape):
            old = param[i]
            param[i] = old + h
            up = mlp.loss_and_grads(small_net, x, y)[0]
            param[i] = old - h
            down = mlp.loss_and_grads(small_net, x, y)[0]
            param[i] = old
            numeric[i] = (up - down) / (2 * h)
        # relative to the gradient's size; central differences are accurate to ~1e-9 here
        scale = max(1.0, float(np.abs(numeric).max()))
        np.testing.assert_allclose(grads[name], numeric, atol=1e-7 * scale, err_msg=name)


def test_population_statistics_equal_a_direct_computation(small_net: mlp.Network) -> None:
    x = np.random.default_rng(12).normal(size=(200, 6))
    got = mlp.population_stats(small_net, x)
    # Direct: layer by layer with numpy's own mean/var; earlier layers in inference mode.
    p = small_net.params
    a = (x - small_net.stats["input.mean"]) / small_net.stats["input.std"]
    for l in range(small_net.n_hidden):
        z = a @ p[f"hidden.{l}.weight"]
        mean, var = np.mean(z, axis=0), np.var(z, axis=0)
        np.testing.assert_allclose(got[l][0], mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[l][1], var, rtol=1e-12)
        gamma, beta = p[f"hidden.{l}.gamma"], p[f"hidden.{l}.beta"]
        a = np.maximum(gamma * (z - mean) / np.sqrt(var + small_net.eps) + beta, 0)


def test_population_statistics_make_inference_equal_full_batch_training_mode(
    small_net: mlp.Network,
) -> None:
    """On the very set they were computed from, population statistics are the batch statistics."""
    x = np.random.default_rng(13).normal(size=(64, 6))
    mlp.set_population_stats(small_net, mlp.population_stats(small_net, x))
    infer = mlp.forward_infer(small_net, x, small_net.layer_stats("population"))
    batch = mlp.softmax(mlp.forward_train(small_net, x).logits)
    np.testing.assert_allclose(infer, batch, rtol=1e-10)


def test_inference_mode_answers_each_row_independently_of_the_batch(
    small_net: mlp.Network,
) -> None:
    x = np.random.default_rng(14).normal(size=(20, 6))
    together = mlp.forward_infer(small_net, x)
    alone = np.concatenate([mlp.forward_infer(small_net, x[i : i + 1]) for i in range(20)])
    np.testing.assert_allclose(alone, together, rtol=1e-12)
    # while train mode (batch statistics) does depend on the company a row keeps
    first_half = mlp.forward_train(small_net, x[:10]).logits
    mixed = mlp.forward_train(small_net, np.concatenate([x[:5], x[10:15]])).logits
    assert np.abs(first_half[:5] - mixed[:5]).max() > 1e-3


def test_training_keeps_running_averages_close_to_population_statistics(
    default_result: TrainResult,
) -> None:
    net = default_result.net
    for (rm, rv), (pm, pv) in zip(
        net.layer_stats("ewma"), net.layer_stats("population"), strict=True
    ):
        # estimates of the same quantity: close relative to the spread of the units
        assert np.abs(rm - pm).max() < 0.25 * np.sqrt(pv).max()
        assert np.all(rv > 0)
