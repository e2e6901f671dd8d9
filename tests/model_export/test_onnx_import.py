"""``bnserve-export --from-onnx``: what it writes, what it refuses (exit 2, nothing written, a
message naming the node and the fix), and that the result is labelled for serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_export import export

RNG = np.random.default_rng(3)


def _t(name: str, value: Any) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _bn_params(prefix: str, c: int) -> list[onnx.TensorProto]:
    return [_t(f"{prefix}.scale", RNG.uniform(0.5, 2.0, c) * RNG.choice([-1, 1], c)),
            _t(f"{prefix}.bias", RNG.normal(size=c)), _t(f"{prefix}.mean", RNG.normal(size=c)),
            _t(f"{prefix}.var", RNG.uniform(0.1, 3.0, c))]


def _bn(prefix: str, x: str, y: str, **attrs: Any) -> onnx.NodeProto:
    names = [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")]
    outputs = attrs.pop("outputs", [y])
    return helper.make_node("BatchNormalization", [x, *names], outputs, name=prefix, **attrs)


def mlp(opset: int = 17, bn_attrs: dict[str, Any] | None = None, n_in: int = 6,
        input_type: int = TensorProto.FLOAT, batch: str | int = "N") -> onnx.ModelProto:
    """input -> BN -> Gemm -> BN -> Relu -> MatMul -> logits [N, 3]."""
    inits = [*_bn_params("bn0", n_in), *_bn_params("bn1", 8),
             _t("W0", RNG.normal(size=(8, n_in))), _t("b0", RNG.normal(size=8)),
             _t("W1", RNG.normal(size=(8, 3)))]
    nodes = [_bn("bn0", "input", "h0"),
             helper.make_node("Gemm", ["h0", "W0", "b0"], ["h1"], name="fc0", transB=1),
             _bn("bn1", "h1", "h2", **(bn_attrs or {})),
             helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
             helper.make_node("MatMul", ["h3", "W1"], ["logits"], name="fc1")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("input", input_type, [batch, n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _run(model: onnx.ModelProto | bytes, x: np.ndarray[Any, Any], optimize: bool = False,
         name: str | None = None) -> list[Any]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return list(sess.run(None, {name or sess.get_inputs()[0].name: x}))


def _export(tmp_path: Path, model: onnx.ModelProto, *args: str) -> tuple[int, Path]:
    src = _save(model, tmp_path / "model.onnx")
    out = tmp_path / "out.onnx"
    return export.main(["--from-onnx", str(src), "--out", str(out), *args]), out


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_mlp_is_folded_verified_and_labelled(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    model = mlp()
    status, out = _export(tmp_path, model, "--classes", "a,b,c", "--features",
                          "f0,f1,f2,f3,f4,f5")
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert ("folded 2 of 2 BatchNormalization (1 into Gemm, 1 into the following Gemm); 0 left;"
            " 5 -> 3 nodes") in printed
    assert "each of 8 samples alone vs inside the batch: 0 differ (bitwise) ... ok" in printed
    folded = onnx.load(str(out))
    assert [n.op_type for n in folded.graph.node] == ["Gemm", "Relu", "MatMul", "Softmax",
                                                      "ArgMax"]
    props = _props(out)
    assert props["format"] == "bnserve-onnx/1"
    assert props["output_kind"] == "classifier"
    assert json.loads(props["class_names"]) == ["a", "b", "c"]
    assert json.loads(props["feature_names"]) == ["f0", "f1", "f2", "f3", "f4", "f5"]
    report = json.loads(props["fold_report"])
    assert report["folded"] == report["batchnorms"] == 2
    assert report["left"] == []
    assert props["model_version"].startswith("sha-")

    x = RNG.normal(size=(16, 6)).astype(np.float32)
    (logits,) = _run(model, x)
    probs, labels, *_ = _run(out.read_bytes(), x, optimize=True, name="features")
    z = logits.astype(np.float64)
    expected = np.exp(z - z.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert (labels == z.argmax(1)).all()


def test_same_input_same_bytes(tmp_path: Path) -> None:
    model = mlp()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _export(tmp_path / "a", model), _export(tmp_path / "b", model)
    assert first[0] == second[0] == 0
    assert first[1].read_bytes() == second[1].read_bytes()


def test_output_kinds(tmp_path: Path) -> None:
    model = mlp()
    status, out = _export(tmp_path, model, "--output-kind", "values")
    assert status == 0
    folded = onnx.load(str(out))
    # bn0 is folded into the Gemm after it: no output of it is left to watch
    assert [o.name for o in folded.graph.output] == ["values", "drift.bn1"]
    assert _props(out)["output_kind"] == "values"
    assert "class_names" not in _props(out)
    x = RNG.normal(size=(4, 6)).astype(np.float32)
    values, _ = _run(out.read_bytes(), x, name="features")
    np.testing.assert_allclose(values, _run(model, x)[0], atol=1e-4)


def test_fixed_batch_of_one_becomes_dynamic(tmp_path: Path) -> None:
    status, out = _export(tmp_path, mlp(batch=1))
    assert status == 0
    dim0 = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "N"


def _refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], model: onnx.ModelProto | bytes,
             *args: str) -> str:
    src = tmp_path / "model.onnx"
    if isinstance(model, bytes):
        src.write_bytes(model)
    else:
        _save(model, src)
    out = tmp_path / "out.onnx"
    status = export.main(["--from-onnx", str(src), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert status == 2, err
    assert not out.exists()
    assert "nothing written" in err
    assert "Traceback" not in err
    return err


def test_training_mode_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(tmp_path, capsys, mlp(opset=15, bn_attrs={"training_mode": 1}))
    assert "BatchNormalization 'bn1' has training_mode=1" in err
    assert "call model.eval() before torch.onnx.export" in err


def test_training_outputs_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = ["h2", "running_mean", "running_var", "saved_mean", "saved_var"]
    err = _refused(tmp_path, capsys, mlp(opset=9, bn_attrs={"outputs": outputs}))
    assert "'bn1' has 4 extra output(s)" in err
    assert "model.eval()" in err


def test_statistics_computed_from_the_input_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = mlp()
    g = model.graph
    g.node.insert(0, helper.make_node("ReduceMean", ["input"], ["batch_mean"], axes=[0],
                                      keepdims=0, name="mean_of_batch"))
    g.node[1].input[3] = "batch_mean"  # bn0's mean: the batch's own, as in training
    model.opset_import[0].version = 17
    err = _refused(tmp_path, capsys, model)
    assert "'bn0': its mean input 'batch_mean' is not a constant" in err


@pytest.mark.parametrize(("content", "words"), [
    (b"this is not a model\n" * 10, "is not an ONNX model"),
    (b"", "is not an ONNX model"),
])
def test_a_file_that_is_not_onnx_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, words: str
) -> None:
    assert words in _refused(tmp_path, capsys, content)


def test_interfaces_it_cannot_serve_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "opset 8" in _refused(tmp_path, capsys, mlp(opset=8))
    assert "is DOUBLE" in _refused(tmp_path, capsys, mlp(input_type=TensorProto.DOUBLE))
    two = mlp()
    two.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N", 2]))
    assert "2 inputs ['input', 'extra']" in _refused(tmp_path, capsys, two)
    symbolic = mlp()
    symbolic.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "F"
    assert "dimension 1 of input 'input' is 'F'" in _refused(tmp_path, capsys, symbolic)
    assert "2 names given" in _refused(tmp_path, capsys, mlp(), "--classes", "a,b")
    assert "--output 'nope' is not an output" in _refused(tmp_path, capsys, mlp(), "--output",
                                                          "nope")


def test_a_weight_shared_with_another_node_is_not_changed(tmp_path: Path) -> None:
    """Two Convs read one weight; only the first is followed by batch norm."""
    w = RNG.normal(size=(4, 3, 3, 3))
    nodes = [helper.make_node("Conv", ["input", "W"], ["c0"], name="conv0"),
             _bn("bn", "c0", "y0"),
             helper.make_node("Conv", ["input", "W"], ["y1"], name="conv1"),
             helper.make_node("Add", ["y0", "y1"], ["y"], name="sum")]
    graph = helper.make_graph(
        nodes, "shared", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                        ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])],
        [_t("W", w), *_bn_params("bn", 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    status, out = _export(tmp_path, model, "--output-kind", "values")
    assert status == 0
    folded = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    convs = {n.name: n for n in folded.graph.node if n.op_type == "Conv"}
    assert convs["conv1"].input[1] == "W"
    np.testing.assert_array_equal(inits["W"], w.astype(np.float32))
    assert convs["conv0"].input[1] != "W"
    x = RNG.normal(size=(3, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(out.read_bytes(), x, name="features")[0],
                               _run(model, x)[0], atol=1e-4)


def test_statistics_read_through_identity_of_a_shared_constant_fold(tmp_path: Path) -> None:
    """PyTorch's TorchScript exporter keeps one initializer for equal parameters (an untouched
    BN's weight and running_var are both ones) and reads the other through Identity."""
    model = mlp()
    g = model.graph
    ones = next(t for t in g.initializer if t.name == "bn1.scale")
    ones.CopyFrom(_t("bn1.scale", np.ones(8)))
    g.node.insert(0, helper.make_node("Identity", ["bn1.scale"], ["bn1.var.copy"], name="id"))
    bn1 = next(n for n in g.node if n.name == "bn1")
    bn1.input[4] = "bn1.var.copy"
    status, out = _export(tmp_path, model, "--output-kind", "values")
    assert status == 0
    report = json.loads(_props(out)["fold_report"])
    assert report["folded"] == 2
    x = RNG.normal(size=(5, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(out.read_bytes(), x, name="features")[0], _run(model, x)[0],
                               atol=1e-4)
