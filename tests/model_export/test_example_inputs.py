"""The example inputs bnserve-export stores in a model's metadata (``example_inputs``, for the
service's OpenAPI examples): exactly values that export verified the file on, read back bit for
bit as float32, and none for inputs too large to be a documentation example."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from model_export import export, graph, onnx_import
from model_export.train import TrainResult


def _props(model_bytes: bytes) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load_from_string(model_bytes).metadata_props}


def _as_served(examples: str) -> np.ndarray[Any, np.dtype[np.float32]]:
    """What the service computes on: JSON numbers -> float64 -> float32."""
    return np.asarray(json.loads(examples), dtype=np.float64).astype(np.float32)


def test_export_stores_the_first_validation_rows(default_result: TrainResult) -> None:
    res = default_result
    meta = {**res.meta, "hidden": [32, 16]}
    exp = export.export(res.net, meta, res.x_val, log=lambda _: None)
    props = _props(exp.model_bytes)
    stored = json.loads(props[graph.EXAMPLES])
    assert stored == res.x_val[:3].tolist()  # the CSV's own numbers, e.g. 13.54, not 13.5399...
    assert np.array_equal(_as_served(props[graph.EXAMPLES]), res.x_val[:3].astype(np.float32))
    assert props[graph.EXAMPLE_SOURCE] == ("the first 3 rows of the validation set export "
                                           "verified on")
    # metadata only: the model version (a hash of the parameters) does not depend on it
    assert props["model_version"] == export.default_version(res.net)


def test_float32_inputs_are_stored_as_the_shortest_decimals_that_read_back_exactly() -> None:
    x = np.random.default_rng(0).normal(size=(5, 2, 7)).astype(np.float32)
    x[0, 0, :4] = [0.1, 1e-30, 3.4e38, -0.0]
    stored = graph.example_inputs(x)
    assert stored is not None
    assert len(stored) == graph.N_EXAMPLES
    text = json.dumps(stored)
    assert np.array_equal(_as_served(text), x[:3])
    assert stored[0][0][:4] == [0.1, 1e-30, 3.4e38, -0.0]
    numbers = text.replace("[", "").replace("]", "").split(", ")
    assert max(map(len, numbers)) <= 15  # 0.1, not 0.10000000149011612


def test_large_inputs_store_fewer_examples_or_none() -> None:
    def stored(*shape: int) -> int | None:
        found = graph.example_inputs(np.zeros(shape, np.float32))
        return None if found is None else len(found)

    assert stored(8, 3, 40, 40) is None  # 4800 values: too big for a documentation example
    assert stored(8, 4096) == 1
    assert stored(8, 3, 32, 32) == 1  # 3072 values
    assert stored(8, 1500) == 2
    assert stored(8, 5, 40) == 3
    assert graph.example_inputs(np.array([[1e39, 0.0]])) is None  # not finite as float32


def test_from_onnx_stores_the_first_samples_it_verified_on(tmp_path: Path) -> None:
    model = _gemm_classifier(tmp_path / "m.onnx")
    generated = onnx_import.import_model(model, onnx_import.Options(), log=lambda _: None)
    props = _props(generated.model_bytes)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)  # onnx_verify.samples
    assert np.array_equal(_as_served(props[graph.EXAMPLES]), x[:3])
    assert props[graph.EXAMPLE_SOURCE] == ("the first 3 of the 8 standard-normal inputs export "
                                           "generated (no --samples)")

    samples = (np.arange(20).reshape(5, 4) / 7).astype(np.float32)
    given = onnx_import.import_model(model, onnx_import.Options(samples=samples),
                                     log=lambda _: None)
    props = _props(given.model_bytes)
    assert np.array_equal(_as_served(props[graph.EXAMPLES]), samples[:3])
    assert props[graph.EXAMPLE_SOURCE] == "the first 3 of --samples"
    # the version hashes the graph, not the metadata
    assert props["model_version"] == _props(generated.model_bytes)["model_version"]


def _gemm_classifier(path: Path) -> Path:
    w = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["input", "W"], ["logits"])], "g",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 4])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 3])],
        [onnx.numpy_helper.from_array(w, "W")])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path
