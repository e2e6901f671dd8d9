"""The export contract at load and warm-up: models of any input shape and either output kind are
accepted when they follow it, and refused (ModelError, the service unready with the reason) when
they do not, including graphs whose answer for an example depends on the batch it is in."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from app.main import create_app
from app.predictor import ModelError, Predictor
from app.settings import Settings

ContractModel = Any  # conftest.ContractModel
Change = Callable[[onnx.ModelProto], None]


def set_meta(**props: str | None) -> Change:
    """Set (or, with None, remove) metadata_props."""

    def change(model: onnx.ModelProto) -> None:
        kept = {p.key: p.value for p in model.metadata_props}
        kept.update(props)
        del model.metadata_props[:]
        helper.set_model_props(model, {k: v for k, v in kept.items() if v is not None})

    return change


def input_shape(*dims: int | str) -> Change:
    def change(model: onnx.ModelProto) -> None:
        model.graph.input[0].CopyFrom(
            helper.make_tensor_value_info("features", TensorProto.FLOAT, list(dims)))

    return change


def then_node(op: str, output: str, **attrs: Any) -> Change:
    """Rename the graph's ``output`` and add ``op`` between it and the graph output."""

    def change(model: onnx.ModelProto) -> None:
        for node in model.graph.node:
            node.output[:] = [f"{output}.pre" if o == output else o for o in node.output]
        model.graph.node.append(helper.make_node(op, [f"{output}.pre"], [output], **attrs))

    return change


def batch_mean_subtracted(model: onnx.ModelProto) -> None:
    """values = values - mean over the batch: what a training-mode normalisation does."""
    g = model.graph
    for node in g.node:
        node.output[:] = ["v.pre" if o == "values" else o for o in node.output]
    g.node.extend([helper.make_node("ReduceMean", ["v.pre"], ["v.mean"], axes=[0], keepdims=1),
                   helper.make_node("Sub", ["v.pre", "v.mean"], ["values"])])


def training_mode_batchnorm(model: onnx.ModelProto) -> None:
    """A BatchNormalization with training_mode=1 in front: ORT normalises with batch statistics."""
    g = model.graph
    for node in g.node:
        node.input[:] = ["bn.out" if i == "features" else i for i in node.input]
    for name, value in (("bn.g", 1.0), ("bn.b", 0.0), ("bn.m", 0.0), ("bn.v", 1.0)):
        g.initializer.append(numpy_helper.from_array(np.full(5, value, np.float32), name))
    g.node.insert(0, helper.make_node(
        "BatchNormalization", ["features", "bn.g", "bn.b", "bn.m", "bn.v"],
        ["bn.out", "bn.rm", "bn.rv"], training_mode=1))


def batch_of_one_reshape(model: onnx.ModelProto) -> None:
    """values reshaped to [1, 200] and back: a graph hard-wired to a batch of one."""
    g = model.graph
    for node in g.node:
        node.output[:] = ["v.pre" if o == "values" else o for o in node.output]
    g.initializer.extend([
        numpy_helper.from_array(np.array([1, 200], dtype=np.int64), "one"),
        numpy_helper.from_array(np.array([-1, 5, 40], dtype=np.int64), "back")])
    g.node.extend([helper.make_node("Reshape", ["v.pre", "one"], ["v.flat"]),
                   helper.make_node("Reshape", ["v.flat", "back"], ["values"])])


def rename_output(old: str, new: str) -> Change:
    def change(model: onnx.ModelProto) -> None:
        for node in model.graph.node:
            node.output[:] = [new if o == old else o for o in node.output]
        for out in model.graph.output:
            if out.name == old:
                out.name = new

    return change


def add_output(model: onnx.ModelProto) -> None:
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))


def int_values(model: onnx.ModelProto) -> None:
    then_node("Cast", "values", to=TensorProto.INT64)(model)
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64


def divided_by_zero(model: onnx.ModelProto) -> None:
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "zero"))
    for node in g.node:
        node.output[:] = ["v.pre" if o == "values" else o for o in node.output]
    g.node.append(helper.make_node("Div", ["v.pre", "zero"], ["values"]))


# (id, base model, change, words of the reason)
BAD: list[tuple[str, str, Change, str]] = [
    ("unknown output_kind", "sequence", set_meta(output_kind="regression"),
     "metadata 'output_kind' is 'regression', expected one of ['classifier', 'values']"),
    ("classifier without class_names", "image", set_meta(class_names=None),
     "'class_names' must be a JSON list"),
    ("values model without an output named values", "sequence",
     rename_output("values", "y"), "outputs are ['y'], expected exactly ['values']"),
    ("values model with two outputs", "sequence", add_output,
     "outputs are ['values', 'r'], expected exactly ['values']"),
    ("values model with int64 values", "sequence", int_values,
     "output 'values' is int64"),
    ("classifier metadata on a values graph", "sequence", set_meta(output_kind="classifier",
                                                                      class_names='["a", "b"]'),
     "output 'probabilities' is missing"),
    ("a symbolic dimension after the batch", "sequence", input_shape("N", 5, "T"),
     "every dimension after the batch must be a fixed positive size"),
    ("a fixed batch dimension", "sequence", input_shape(1, 5, 40),
     "its first (batch) dimension is fixed; it must be dynamic"),
    ("1-D values model without feature_names", "regression", set_meta(feature_names=None),
     "'feature_names' must be a JSON list"),
    ("fold_report not an object", "sequence", set_meta(fold_report='"folded"'),
     "metadata 'fold_report' must be a JSON object"),
    ("fold_report not JSON", "sequence", set_meta(fold_report="folded 3 of 3"),
     "metadata 'fold_report' must be a JSON object"),
    ("answer depends on the batch", "sequence", batch_mean_subtracted,
     "failed the warm-up check: example 0 gives a different answer alone than inside a batch "
     "of 8: the graph is not in inference mode"),
    ("batch norm exported in training mode", "sequence", training_mode_batchnorm,
     "gives a different answer alone than inside a batch"),
    ("graph hard-wired to a batch of one", "sequence", batch_of_one_reshape,
     "failed the warm-up check: running a batch of 8 failed"),
    ("values not finite", "sequence", divided_by_zero,
     "failed the warm-up check: values are not all finite"),
]


def changed(model: ContractModel, change: Change, path: Path) -> Path:
    proto = onnx.load(model.path)
    change(proto)
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.mark.parametrize(("base", "change", "reason"), [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])
def test_model_breaking_the_contract_is_refused_with_the_reason(
    contract_models: dict[str, Any], tmp_path: Path, base: str, change: Change, reason: str
) -> None:
    path = changed(contract_models[base], change, tmp_path / "bad.onnx")
    with pytest.raises(ModelError) as err:
        Predictor.load(path).warm_up(max_batch=16)
    assert reason in str(err.value)
    assert str(path) in str(err.value)


def test_service_with_a_refused_model_stays_unready_and_says_why(
    contract_models: dict[str, Any], tmp_path: Path
) -> None:
    path = changed(contract_models["sequence"], training_mode_batchnorm, tmp_path / "bn.onnx")
    with TestClient(create_app(Settings(model_path=path))) as client:
        deadline = time.monotonic() + 10
        while not client.get("/readyz").json()["reason"].startswith("model not loaded"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = client.get("/readyz")
        assert r.status_code == 503
        assert "not in inference mode" in r.json()["reason"]
        r = client.post("/predict", json={"features": np.zeros((5, 40)).tolist()})
        assert r.status_code == 503


def test_what_the_contract_leaves_open_is_accepted(
    contract_models: dict[str, Any], tmp_path: Path
) -> None:
    # output_kind absent: a classifier, as in files written before issue 9
    image = changed(contract_models["image"], set_meta(output_kind=None), tmp_path / "a.onnx")
    predictor = Predictor.load(image)
    predictor.warm_up(8)
    assert predictor.info.output_kind == "classifier"
    assert predictor.info.class_names == contract_models["image"].class_names
    assert predictor.info.fold_report is not None
    assert predictor.info.fold_report["into"] == {"Conv": 1}
    # feature names on an N-D input are not used (requests are nested lists), and not shown
    seq = changed(contract_models["sequence"], set_meta(feature_names='["a"]'),
                  tmp_path / "b.onnx")
    predictor = Predictor.load(seq)
    predictor.warm_up(8)
    assert predictor.info.feature_names is None
    # class names on a values model are not used either
    seq = changed(contract_models["sequence"], set_meta(class_names='["a", "b"]'),
                  tmp_path / "c.onnx")
    predictor = Predictor.load(seq)
    assert predictor.info.class_names is None
