from __future__ import annotations

import numpy as np
import pytest

from model_export import data, mlp
from model_export.train import TrainConfig, TrainResult, train


@pytest.fixture(scope="session")
def default_result() -> TrainResult:
    """The default network trained on the shipped data (about half a second)."""
    return train(data.load_default(), TrainConfig(), log=lambda _: None)


@pytest.fixture
def small_net() -> mlp.Network:
    """A small untrained network with non-trivial gamma/beta/statistics, for gradient checks."""
    rng = np.random.default_rng(7)
    net = mlp.init_network(6, [5, 4], 3, rng.normal(size=6), rng.uniform(0.5, 2.0, 6), rng)
    for l in range(net.n_hidden):
        net.params[f"hidden.{l}.gamma"] = rng.uniform(
            0.5, 1.5, net.params[f"hidden.{l}.gamma"].shape
        )
        net.params[f"hidden.{l}.beta"] = rng.normal(0.0, 0.3, net.params[f"hidden.{l}.beta"].shape)
    net.params["output.bias"] = rng.normal(size=3)
    return net
