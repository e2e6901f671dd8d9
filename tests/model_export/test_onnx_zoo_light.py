"""The batch-norm models that ship inside the ``onnx`` wheel (its backend test data, "light"
versions of ResNet-50, DenseNet-121, Inception-v2 and ShuffleNet) fold and still give their
reference outputs.

Their weights are built by ``ConstantOfShape`` nodes (all zeros), which makes the shipped reference
outputs nearly constant; so each model is also checked with those weights replaced by random ones
(and positive variances), against the original file run by ONNX Runtime with its own graph
optimisations off. Tolerance: 1e-4 x max(1, max |output|), as ``bnserve-export`` states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from model_export import export

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = ["light_resnet50", "light_densenet121", "light_inception_v2", "light_shufflenet"]


def _dummy_input(model: onnx.ModelProto) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The input onnx's own backend test feeds these models: arange(n) / n."""
    inits = {t.name for t in model.graph.initializer}
    (inp,) = [v for v in model.graph.input if v.name not in inits]
    shape = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


def _run(data: bytes, x: np.ndarray[Any, Any], optimize: bool) -> np.ndarray[Any, Any]:
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def _fold(tmp_path: Path, model: onnx.ModelProto, x: np.ndarray[Any, Any]) -> tuple[int, Path]:
    src, out, samples = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "x.npy"
    onnx.save(model, str(src))
    np.save(samples, x)
    status = export.main(["--from-onnx", str(src), "--out", str(out), "--output-kind", "values",
                          "--samples", str(samples)])
    return status, out


def _n_bn(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_shipped_model_folds_and_matches_its_reference_output(tmp_path: Path, name: str) -> None:
    model = onnx.load(str(LIGHT / f"{name}.onnx"))
    expected = numpy_helper.to_array(
        onnx.load_tensor(str(LIGHT / f"{name}_output_0.pb"))).astype(np.float64)
    x = _dummy_input(model)  # [1, ...]; a second, different sample for the batch checks
    status, out = _fold(tmp_path, model, np.concatenate([x, 1 - x]))
    assert status == 0
    folded = onnx.load(str(out))
    assert _n_bn(model) > 0
    assert _n_bn(folded) == 0
    got = _run(out.read_bytes(), x, optimize=True)
    tol = 1e-4 * max(1.0, float(np.abs(expected).max()))
    assert float(np.abs(got - expected).max()) <= tol


def _randomised(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """Every ConstantOfShape weight replaced by random values of its shape: variances positive,
    convolution and Gemm weights scaled by 1/sqrt(fan-in) so activations stay finite."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    variances = {n.input[4] for n in g.node if n.op_type == "BatchNormalization"}
    weights = {n.input[1] for n in g.node if n.op_type in ("Conv", "Gemm")}
    for node in [n for n in g.node if n.op_type == "ConstantOfShape"]:
        shape = tuple(int(d) for d in inits[node.input[0]])
        name = node.output[0]
        if name in variances:
            value = rng.uniform(0.5, 2.0, shape)
        elif name in weights:
            value = rng.normal(size=shape) / np.sqrt(max(1, int(np.prod(shape[1:]))))
        else:
            value = rng.normal(size=shape)
        g.node.remove(node)
        g.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    return m


@pytest.mark.slow
@pytest.mark.parametrize("name", ["light_resnet50", "light_shufflenet"])
def test_with_random_weights_the_folded_model_equals_the_original(
    tmp_path: Path, name: str
) -> None:
    model = _randomised(onnx.load(str(LIGHT / f"{name}.onnx")), seed=0)
    x = np.random.default_rng(1).normal(size=(2, 3, 224, 224)).astype(np.float32)
    original = model.SerializeToString()  # its batch size is fixed at 1: one sample at a time
    expected = np.concatenate([_run(original, x[i : i + 1], optimize=False) for i in range(2)])
    assert np.isfinite(expected).all()
    assert expected.std() > 1e-3  # not a constant output: the check below can fail
    status, out = _fold(tmp_path, model, x)
    assert status == 0
    got = _run(out.read_bytes(), x, optimize=True)
    tol = 1e-4 * max(1.0, float(np.abs(expected).max()))
    assert float(np.abs(got - expected).max()) <= tol
