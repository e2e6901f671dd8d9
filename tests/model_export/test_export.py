"""Export: folding against ONNX's own BatchNormalization (ONNX Runtime and onnx.reference), the
graph's interface and metadata, self-verification that refuses bad graphs, and the commands end to
end with byte-identical reproducibility."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from model_export import batchnorm, checkpoint, export, graph, mlp, train
from model_export.train import TrainResult

TOL = 1e-5  # float32 graphs against each other and against float64 numpy


def _ref(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[Any]:
    out = ReferenceEvaluator(model).run(None, feeds)
    assert isinstance(out, list)
    return out


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, feeds)]


def _model(
    nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], n_in: int, n_out: int
) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", graph.OPSET)])
    m.ir_version = graph.IR_VERSION
    onnx.checker.check_model(m, full_check=True)
    return m


def test_folding_equals_onnx_batchnormalization_in_onnxruntime_and_onnx_reference() -> None:
    rng = np.random.default_rng(0)
    n_in, n_out, eps = 7, 5, 1e-3
    w, b = rng.normal(size=(n_in, n_out)), rng.normal(size=n_out)
    gamma, beta = rng.uniform(0.5, 2, n_out), rng.normal(size=n_out)
    mean, var = rng.normal(size=n_out), rng.uniform(0.1, 4, n_out)
    x = rng.normal(size=(32, n_in)).astype(np.float32)

    unfolded = _model(
        [
            helper.make_node("Gemm", ["x", "W", "b"], ["z"]),
            helper.make_node(
                "BatchNormalization", ["z", "gamma", "beta", "mean", "var"], ["y"], epsilon=eps
            ),
        ],
        {"W": w, "b": b, "gamma": gamma, "beta": beta, "mean": mean, "var": var},
        n_in,
        n_out,
    )
    w2, b2 = batchnorm.fold_into_linear(w, b, gamma, beta, mean, var, eps)
    folded = _model(
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"])], {"W": w2, "b": b2}, n_in, n_out
    )

    bn_ort = _ort(unfolded, {"x": x})[0]
    bn_ref = np.asarray(_ref(unfolded, {"x": x})[0])
    np.testing.assert_allclose(bn_ort, bn_ref, atol=TOL)
    for run in (
        lambda m: _ort(m, {"x": x})[0],
        lambda m: _ref(m, {"x": x})[0],
    ):
        np.testing.assert_allclose(run(folded), bn_ort, atol=TOL)
    numpy_ref = batchnorm.forward_infer(x.astype(np.float64) @ w + b, gamma, beta, mean, var, eps)
    np.testing.assert_allclose(bn_ort, numpy_ref, atol=TOL)


@pytest.fixture(scope="module")
def exported(default_result: TrainResult) -> dict[bool, onnx.ModelProto]:
    meta = {**default_result.meta, "hidden": [32, 16]}
    return {
        folded: onnx.load_from_string(
            export.export(
                default_result.net, meta, default_result.x_val, folded=folded, log=lambda _: None
            ).model_bytes
        )
        for folded in (True, False)
    }


def test_folded_graph_has_only_gemm_relu_softmax_argmax(
    exported: dict[bool, onnx.ModelProto],
) -> None:
    ops = [n.op_type for n in exported[True].graph.node]
    assert ops == ["Gemm", "Relu", "Gemm", "Relu", "Gemm", "Softmax", "ArgMax"]
    kept = [n.op_type for n in exported[False].graph.node]
    assert kept.count("BatchNormalization") == 2
    assert exported[True].opset_import[0].version == 17


def test_graph_interface_and_metadata(
    exported: dict[bool, onnx.ModelProto], default_result: TrainResult
) -> None:
    m = exported[True]
    assert [i.name for i in m.graph.input] == ["features"]
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 30]
    assert [o.name for o in m.graph.output] == ["probabilities", "label", "drift.bn0", "drift.bn1"]
    props = {p.key: p.value for p in m.metadata_props}
    assert json.loads(props["feature_names"]) == default_result.meta["feature_names"]
    assert json.loads(props["class_names"]) == ["benign", "malignant"]
    assert props["folded"] == "true"
    assert {p.value for p in exported[False].metadata_props if p.key == "folded"} == {"false"}
    assert float(props["eps"]) == 1e-5
    assert props["estimator"] == "ewma"
    assert float(props["beta_avg"]) == 0.9
    assert float(props["val_accuracy"]) == default_result.meta["figures"]["val_accuracy"]
    assert props["data_sha256"] == default_result.meta["data_sha256"]
    assert props["model_version"].startswith("sha-")


def test_exported_graphs_run_by_onnx_reference_equal_numpy_forward(
    exported: dict[bool, onnx.ModelProto], default_result: TrainResult
) -> None:
    x = default_result.x_val.astype(np.float32)
    ref = mlp.forward_infer(default_result.net, x.astype(np.float64))
    for model in exported.values():
        probs, labels, *_ = _ref(model, {"features": x})  # then the drift outputs
        np.testing.assert_allclose(probs, ref, atol=TOL)
        np.testing.assert_array_equal(labels, ref.argmax(axis=1))


def test_export_refuses_a_graph_that_disagrees_with_the_network(
    default_result: TrainResult,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = graph.folded_layers

    def off_by_a_little(net: mlp.Network) -> list[tuple[np.ndarray, np.ndarray]]:
        layers = real(net)
        w, b = layers[-1]
        layers[-1] = (w, b + np.array([0.05, 0.0]))  # a wrong bias: small, but not within 1e-5
        return layers

    monkeypatch.setattr(graph, "folded_layers", off_by_a_little)
    ckpt = tmp_path / "m.ckpt"
    checkpoint.save(
        ckpt, default_result.net, default_result.meta, default_result.x_val, default_result.y_val
    )
    out = tmp_path / "m.onnx"
    assert export.main(["--checkpoint", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime vs numpy inference forward" in err
    assert "FAILED" in err
    assert not out.exists()


def _train_and_export(tmp_path: Path, *extra: str, folded: bool = True) -> tuple[bytes, bytes, str]:
    ckpt, model = tmp_path / "m.ckpt", tmp_path / "m.onnx"
    assert train.main([*extra, "--out", str(ckpt)]) == 0
    assert (
        export.main(
            [
                "--checkpoint",
                str(ckpt),
                "--out",
                str(model),
                *([] if folded else ["--keep-batchnorm"]),
            ]
        )
        == 0
    )
    return ckpt.read_bytes(), model.read_bytes(), str(model)


@pytest.mark.slow
def test_default_export_end_to_end_is_verified_and_byte_identical(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt1, model1, path = _train_and_export(tmp_path / "a")
    out = capsys.readouterr().out
    assert "epoch  40/40" in out
    assert out.count("... ok") == 6
    assert "0 differ (bitwise)" in out
    ckpt2, model2, _ = _train_and_export(tmp_path / "b")
    assert ckpt1 == ckpt2
    assert model1 == model2
    _, model3, _ = _train_and_export(tmp_path / "c", "--seed", "1")
    assert model3 != model1  # the seed matters, so the equality above is not vacuous
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert float(meta["val_accuracy"]) > 0.9


@pytest.mark.slow
def test_user_csv_with_string_labels_and_population_estimator(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    names = ["setosa", "versicolor", "virginica"]
    lines = ["width,height,weight,ignored,species"]
    for i in range(150):
        c = i % 3
        w, h, m = rng.normal([c, 2 * c, -c], 0.5)
        lines.append(f"{w:.4f},{h:.4f},{m:.4f},{rng.normal():.3f},{names[c]}")
    csv = tmp_path / "flowers.csv"
    csv.write_text("\n".join(lines) + "\n")
    args = [
        "--data",
        str(csv),
        "--target",
        "species",
        "--features",
        "width,height,weight",
        "--hidden",
        "8",
        "--epochs",
        "30",
        "--batch-size",
        "16",
        "--estimator",
        "population",
    ]
    _, model_bytes, _ = _train_and_export(tmp_path, *args, folded=False)
    net, meta, vx, vy = checkpoint.load(tmp_path / "m.ckpt")
    assert meta["class_names"] == names
    assert net.estimator == "population"
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    assert sess.get_modelmeta().custom_metadata_map["estimator"] == "population"
    probs, labels, *_ = sess.run(None, {"features": vx.astype(np.float32)})  # then drift.*
    pop = mlp.forward_infer(
        net, vx.astype(np.float32).astype(np.float64), net.layer_stats("population")
    )
    np.testing.assert_allclose(probs, pop, atol=TOL)
    assert (labels == vy).mean() > 0.8  # well-separated classes; chance is 1/3


def test_train_command_reports_bad_data_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "one.csv"
    csv.write_text("a,y\n1,p\n2,p\n3,p\n")
    assert train.main(["--data", str(csv), "--target", "y", "--out", str(tmp_path / "m.ckpt")]) == 2
    assert "at least 2 are needed" in capsys.readouterr().err
    assert not (tmp_path / "m.ckpt").exists()
