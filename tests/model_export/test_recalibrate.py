"""bnserve-recalibrate: batch-norm statistics re-estimated on a new population, checked against
direct computations (numpy's own mean and var, layer by layer; onnx.reference's intermediate
tensors for imported graphs), and the written model against the service's loader."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from app.predictor import Predictor
from model_export import checkpoint, data, export, mlp, onnx_import, onnx_recalibrate, recalibrate
from model_export.train import TrainConfig, TrainResult, train

TORCH = Path(__file__).parents[1] / "fixtures" / "torch"


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _probs(path: Path, x: NDArray[Any]) -> NDArray[np.float32]:
    pred = Predictor.load(path)
    out: NDArray[np.float32] = pred.predict(x.astype(np.float32))[0]
    return out


def _direct_population_stats(net: mlp.Network, x: NDArray[np.float64]) -> list[tuple[Any, Any]]:
    """Layer by layer with numpy's mean and var, not batchnorm.py: the reference."""
    a = (x - net.stats["input.mean"]) / net.stats["input.std"]
    out = []
    for l in range(net.n_hidden):
        z = a @ net.params[f"hidden.{l}.weight"]
        mu, var = np.mean(z, axis=0), np.var(z, axis=0)
        out.append((mu, var))
        g, b = net.params[f"hidden.{l}.gamma"], net.params[f"hidden.{l}.beta"]
        a = np.maximum(g * (z - mu) / np.sqrt(var + net.eps) + b, 0.0)
    return out


@pytest.fixture(scope="module")
def trained() -> TrainResult:
    return train(data.load_default(), TrainConfig(epochs=5, hidden=(12, 8)), log=lambda _: None)


@pytest.fixture
def saved(trained: TrainResult, tmp_path: Path) -> Path:
    path = tmp_path / "m.ckpt"
    checkpoint.save(path, trained.net, trained.meta, trained.x_val, trained.y_val)
    return path


# ---------------------------------------------------------------- checkpoints


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "hidden", "standardisation"),
                         [(0, (16, 8), False), (1, (7,), True), (2, (9, 6, 5), False)])
def test_recalibrating_on_its_own_training_inputs_reproduces_the_population_model(
    tmp_path: Path, seed: int, hidden: tuple[int, ...], standardisation: bool
) -> None:
    res = train(data.load_default(), TrainConfig(epochs=4, hidden=hidden, seed=seed),
                log=lambda _: None)  # estimator ewma: the running averages are served
    ckpt = tmp_path / "ewma.ckpt"
    checkpoint.save(ckpt, res.net, res.meta, res.x_val, res.y_val)
    np.save(tmp_path / "train.npy", res.x_train)
    args = ["--checkpoint", str(ckpt), "--data", str(tmp_path / "train.npy"),
            "--out", str(tmp_path / "r.onnx"), "--out-checkpoint", str(tmp_path / "r.ckpt")]
    assert recalibrate.main(args + (["--standardisation"] if standardisation else [])) == 0

    new, meta, _, _ = checkpoint.load(tmp_path / "r.ckpt")
    assert new.estimator == "population"
    direct = _direct_population_stats(res.net, res.x_train)
    for (mu, var), (mu_d, var_d), (mu_p, var_p), (mu_r, var_r) in zip(
        new.layer_stats(), direct, res.net.layer_stats("population"),
        res.net.layer_stats("ewma"), strict=True
    ):
        np.testing.assert_allclose(mu, mu_d, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(var, var_d, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(mu, mu_p, rtol=1e-12, atol=1e-14)  # training's estimator
        np.testing.assert_allclose(var, var_p, rtol=1e-12, atol=1e-14)
        # after 4 epochs the running averages are visibly different: the check above can fail
        assert np.abs(mu - mu_r).max() > 1e-3 or np.abs(var - var_r).max() > 1e-3
    np.testing.assert_allclose(new.stats["input.std"], res.net.stats["input.std"], rtol=1e-12)

    pop, saved_meta, _, _ = checkpoint.load(ckpt)
    pop.estimator = "population"  # what bnserve-train --estimator population would serve
    (tmp_path / "pop.onnx").write_bytes(export.export(pop, saved_meta, res.x_val,
                                                      log=lambda _: None).model_bytes)
    x = np.concatenate([res.x_val, res.x_train])
    p_recal, p_pop = _probs(tmp_path / "r.onnx", x), _probs(tmp_path / "pop.onnx", x)
    # same float64 statistics folded the same way: float32 rounding apart, equal predictions
    assert float(np.abs(p_recal - p_pop).max()) <= 1e-6
    assert (p_recal.argmax(axis=1) == p_pop.argmax(axis=1)).all()
    assert meta[recalibrate.KEY]["rows"] == len(res.x_train)


@pytest.mark.slow
def test_written_model_passes_the_service_loader_and_says_what_it_came_from(
    saved: Path, trained: TrainResult, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    x = trained.x_train * rng.uniform(0.5, 2.0, trained.x_train.shape[1])
    np.save(tmp_path / "new.npy", x)
    out = tmp_path / "r.onnx"
    assert recalibrate.main(["--checkpoint", str(saved), "--data", str(tmp_path / "new.npy"),
                             "--out", str(out), "--model-version", "v2"]) == 0
    pred = Predictor.load(out)
    pred.warm_up(8)
    assert pred.info.model_version == "v2"
    source = json.loads(pred.info.metadata[recalibrate.KEY])
    assert source["model_version"] == export.default_version(trained.net)
    assert source["data_sha256"] == hashlib.sha256((tmp_path / "new.npy").read_bytes()).hexdigest()
    assert source["rows"] == len(x)
    assert source["reestimated"] == ["batchnorm"]
    # the served probabilities are those of the numpy network with the new statistics
    net = recalibrate.recalibrate_network(trained.net, x)
    ref = mlp.forward_infer(net, x.astype(np.float32).astype(np.float64))
    assert float(np.abs(pred.predict(x.astype(np.float32))[0] - ref).max()) <= 1e-5


@pytest.mark.slow
def test_same_model_and_data_give_the_same_bytes_and_a_new_version(
    saved: Path, trained: TrainResult, tmp_path: Path
) -> None:
    np.save(tmp_path / "new.npy", trained.x_train + 0.5 * trained.x_train.std(axis=0))
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        assert recalibrate.main(["--checkpoint", str(saved), "--data",
                                 str(tmp_path / "new.npy"), "--out", str(out)]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert _props(outs[0])["model_version"] != export.default_version(trained.net)


def test_standardisation_undoes_an_affine_change_of_the_inputs(trained: TrainResult) -> None:
    """x' = a x + b with a > 0 is exactly absorbed by a re-estimated standardisation: the
    recalibrated model on shifted rows answers as the population model on the original rows."""
    rng = np.random.default_rng(5)
    f = trained.x_train.shape[1]
    a, b = rng.uniform(0.5, 2.0, f), rng.normal(0.0, 1.0, f) * trained.x_train.std(axis=0)
    before = recalibrate.recalibrate_network(trained.net, trained.x_train, standardisation=True)
    after = recalibrate.recalibrate_network(trained.net, a * trained.x_train + b,
                                            standardisation=True)
    p0 = mlp.forward_infer(before, trained.x_val)
    p1 = mlp.forward_infer(after, a * trained.x_val + b)
    assert float(np.abs(p0 - p1).max()) <= 1e-9
    only_bn = recalibrate.recalibrate_network(trained.net, a * trained.x_train + b)
    p2 = mlp.forward_infer(only_bn, a * trained.x_val + b)
    assert float(np.abs(p0 - p2).max()) > 1e-3  # batch norm alone cannot reweight features


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return path


def test_csv_columns_are_found_by_name_and_the_others_ignored(
    saved: Path, trained: TrainResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = list(trained.meta["feature_names"])
    order = names[::-1]  # any column order
    rows = [["x", *(repr(float(v)) for v in row[::-1])] for row in trained.x_train[:40]]
    path = _csv(tmp_path / "new.csv", ["diagnosis", *order], rows)
    assert recalibrate.main(["--checkpoint", str(saved), "--data", str(path), "--out",
                             str(tmp_path / "r.onnx"), "--out-checkpoint",
                             str(tmp_path / "r.ckpt")]) == 0
    assert "ignored columns (not features of the model): diagnosis" in capsys.readouterr().out
    new, _, _, _ = checkpoint.load(tmp_path / "r.ckpt")
    expected = mlp.population_stats(trained.net, trained.x_train[:40])
    for (mu, var), (mu_e, var_e) in zip(new.layer_stats(), expected, strict=True):
        np.testing.assert_array_equal(mu, mu_e)  # repr() round-trips float64 exactly
        np.testing.assert_array_equal(var, var_e)


@pytest.mark.parametrize(("make", "message"), [
    (lambda d, n: _csv(d / "a.csv", n[1:], [["1"] * 29] * 40),
     f"feature columns ['{data.load_default().feature_names[0]}'] are missing"),
    (lambda d, n: _csv(d / "a.csv", n, [["1"] * 30] * 39 + [["1"] * 29 + ["abc"]]),
     "line 41, column 'fractal_dimension_worst': 'abc' is not a number"),
    (lambda d, n: _csv(d / "a.csv", n, [["1"] * 30] * 39 + [["nan"] * 30]),
     "line 41, column 'radius_mean': 'nan' is missing or not finite"),
    (lambda d, n: _csv(d / "a.csv", n, [["1"] * 30] * 10),
     "10 rows; recalibration needs at least 32"),
    (lambda d, n: _npy(d, np.ones((40, 29))), "expected [N, 30]"),
    (lambda d, n: _npy(d, np.where(np.arange(40 * 30).reshape(40, 30) == 65, np.nan, 1.0)),
     "1 NaN or infinite value(s), the first at index (2, 5)"),
    (lambda d, n: _npy(d, np.array([["a"] * 30] * 40)), "expected a numeric (float) array"),
    (lambda d, n: d / "missing.npy", "data file not found"),
    (lambda d, n: (d / "a.json").write_text("{}") and d / "a.json", "expected a .csv or .npy"),
])
def test_bad_new_data_is_refused_with_the_reason_and_nothing_is_written(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, message: str
) -> None:
    names = list(data.load_default().feature_names)
    path = make(tmp_path, names)
    out = tmp_path / "r.onnx"
    assert recalibrate.main(["--checkpoint", str(saved), "--data", str(path), "--out",
                             str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "nothing written" in err
    assert not out.exists()


def _npy(d: Path, x: NDArray[Any]) -> Path:
    np.save(d / "a.npy", x)
    return d / "a.npy"


# ---------------------------------------------------------------- unfolded ONNX graphs


def test_pooled_stats_over_chunks_equal_numpy_over_everything() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (23, 4, 5, 3)) * rng.uniform(0.1, 10, (1, 4, 1, 1)) + 100.0
    mean, var, count = onnx_recalibrate.pooled_stats(x[i : i + 7] for i in range(0, 23, 7))
    assert count == 23 * 5 * 3
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(var, x.var(axis=(0, 2, 3)), rtol=1e-10)


def _bn_inputs(model: onnx.ModelProto, x: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
    bns = onnx_recalibrate.batchnorms(model)
    names = [n.input[0] for n in bns]
    feed = model.graph.input[0].name
    values = ReferenceEvaluator(model).run(names, {feed: x})
    return {n.name: np.asarray(v, dtype=np.float64) for n, v in zip(bns, values, strict=True)}


def _bn_params(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[Any, Any]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return inits[node.input[3]].astype(np.float64), inits[node.input[4]].astype(np.float64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet_basic", "mlp_bn1d"])
def test_imported_graph_gets_each_batchnorms_statistics_of_the_new_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setattr(onnx_recalibrate, "CHUNK", 7)  # several chunks, pooled
    base = np.load(TORCH / f"{name}.inputs.npy")
    rng = np.random.default_rng(1)
    x = np.concatenate([base + rng.normal(0, 0.3, base.shape) for _ in range(4)])
    x = (x * 1.7 + 0.5).astype(np.float32)  # a new population: rescaled and offset
    np.save(tmp_path / "new.npy", x)
    out, unfolded = tmp_path / "r.onnx", tmp_path / "unfolded.onnx"
    assert recalibrate.main(["--onnx", str(TORCH / f"{name}.onnx"), "--data",
                             str(tmp_path / "new.npy"), "--out", str(out), "--out-unfolded",
                             str(unfolded), "--min-rows", "8"]) == 0  # logits: a classifier

    # One reference evaluation of the recalibrated graph: every batch norm holds the mean and
    # biased variance of what reaches it, so each one was taken with those before it updated.
    model, original = onnx.load(str(unfolded)), onnx.load(str(TORCH / f"{name}.onnx"))
    seen = _bn_inputs(model, x)
    moved = 0.0
    for node, old in zip(onnx_recalibrate.batchnorms(model), onnx_recalibrate.batchnorms(original),
                         strict=True):
        axes = (0, *range(2, seen[node.name].ndim))
        mu, var = seen[node.name].mean(axis=axes), seen[node.name].var(axis=axes)
        got_mu, got_var = _bn_params(model, node)
        scale = float(np.sqrt(var.max()))
        np.testing.assert_allclose(got_mu, mu, rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(got_var, var, rtol=1e-4, atol=1e-5 * scale**2)
        old_mu, old_var = _bn_params(original, old)
        moved = max(moved, float(np.abs(old_mu - mu).max() / scale),
                    float(np.abs(np.log(old_var / var)).max()))
    assert moved > 0.1  # the old statistics fail the same check

    # the folded, served file computes what the recalibrated graph computes
    result: Any = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x})
    logits = np.asarray(result[0])
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    pred = Predictor.load(out)
    pred.warm_up(8)
    probs, _ = pred.predict(x)
    assert float(np.abs(probs - e / e.sum(axis=1, keepdims=True)).max()) <= 1e-4
    source = json.loads(_props(out)[recalibrate.KEY])
    assert source["rows"] == len(x)
    assert len(source["reestimated"]) == len(seen)


def test_a_graph_exported_in_training_mode_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "new.npy", np.ones((40, 13), dtype=np.float32))
    assert recalibrate.main(["--onnx", str(TORCH / "train_mode.onnx"), "--data",
                             str(tmp_path / "new.npy"), "--out", str(tmp_path / "r.onnx")]) == 2
    assert "model.eval()" in capsys.readouterr().err
    assert not (tmp_path / "r.onnx").exists()


def test_batchnorms_sharing_their_statistics_each_get_their_own(tmp_path: Path) -> None:
    """Two batch norms read the same mean and var initializers (as an exporter writes equal
    tensors once): each ends up with its own; the first reads the graph input itself."""
    from onnx import TensorProto, helper  # noqa: PLC0415

    ones, zeros = np.ones(2, np.float32), np.zeros(2, np.float32)
    inits = [numpy_helper.from_array(v, n) for n, v in
             (("g", ones), ("b", zeros), ("m", zeros), ("v", ones))]
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["h"], name="bn_a"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["y"], name="bn_b")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 2])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.random.default_rng(0).normal([3.0, -1.0], [2.0, 0.5], (50, 2)).astype(np.float32)
    iface = onnx_import.interface(model, None)
    out, layers = onnx_recalibrate.recalibrate(model, iface, x, log=lambda _: None)
    a, b = onnx_recalibrate.batchnorms(out)
    x64 = x.astype(np.float64)
    mu_a, var_a = _bn_params(out, a)
    np.testing.assert_allclose(mu_a, x64.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(var_a, x64.var(axis=0), rtol=1e-6)
    r = np.maximum((x64 - mu_a) / np.sqrt(var_a + 1e-5), 0.0)  # gamma 1, beta 0
    mu_b, var_b = _bn_params(out, b)
    np.testing.assert_allclose(mu_b, r.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(var_b, r.var(axis=0), rtol=1e-5)
    # the first got a fresh pair while "m"/"v" were shared; the last reader may then own them
    assert a.input[3] != b.input[3]
    assert a.input[4] != b.input[4]
    assert [s.values_per_channel for s in layers] == [50, 50]
