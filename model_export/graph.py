"""Parameters -> ONNX graph, in inference mode only: nothing in the graph ever looks at a batch.

Interface (what ``app/`` relies on):
    input   features       float32 [N, n_features]   raw feature values, in ``feature_names`` order
    output  probabilities  float32 [N, n_classes]    softmax over ``class_names``
    output  label          int64   [N]               argmax index into ``class_names``
    output  drift.bn<l>    float32 [N, hidden[l]]    layer l's batch-norm output z~, before ReLU:
                                                     for drift monitoring only, described by
                                                     metadata ``drift_reference``
                                                     (``model_export/drift_reference.py``);
                                                     absent with ``drift=False``

Folded (default): standardisation and every Linear+BatchNorm pair become one Gemm each. With
x_std = (x - m) / s and z = x_std @ W, the Linear on raw x is W0 = W / s (rows) with bias
b0 = -(m / s) @ W; batch norm then folds in as W' = W0 * scale, b' = (b0 - mu) * scale + beta,
scale = gamma / sqrt(var + eps) (``batchnorm.fold_into_linear``). All folding is done in float64
and cast to float32 once.

Keep-batchnorm: Sub/Div standardisation, MatMul, and explicit BatchNormalization nodes (inference
mode, the default ``training_mode=0``) holding gamma, beta, running mean and variance.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from model_export import batchnorm, drift_reference
from model_export.batchnorm import Array
from model_export.mlp import Network

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17: readable by any runtime that runs it
INPUT = "features"
OUTPUT_PROBS = "probabilities"
OUTPUT_LABEL = "label"
FORMAT = "bnserve-onnx/1"
# Metadata: a few of the inputs export verified the file on, as JSON nested lists, and which ones
# (app/docs.py makes the OpenAPI document's request examples from them).
EXAMPLES = "example_inputs"
EXAMPLE_SOURCE = "example_source"
N_EXAMPLES = 3
MAX_EXAMPLE_VALUES = 4096  # in all; an example larger than this is not stored (too big for docs)


def example_inputs(x: NDArray[Any]) -> list[Any] | None:
    """The first inputs of ``x`` [n, *shape] (``N_EXAMPLES``, or fewer so that they hold at
    most ``MAX_EXAMPLE_VALUES`` values) as JSON-ready nested lists whose numbers read back
    (JSON -> float64 -> float32, as the service reads them) as exactly ``x``'s float32 values:
    float64 inputs (a CSV's) as they are, float32 ones as the shortest decimals that do. None if
    one example has more than ``MAX_EXAMPLE_VALUES`` values or a value is not finite in
    float32."""
    size = int(np.prod(np.shape(x)[1:]))
    if size > MAX_EXAMPLE_VALUES:
        return None
    rows = np.asarray(x[: min(N_EXAMPLES, MAX_EXAMPLE_VALUES // size)])
    with np.errstate(over="ignore"):
        x32 = rows.astype(np.float32)
    if not np.isfinite(x32).all():
        return None
    values = rows.astype(np.float64)
    if rows.dtype == np.float32:
        short = np.array([float(str(v)) for v in x32.ravel()]).reshape(x32.shape)
        if np.array_equal(short.astype(np.float32), x32):
            values = short
    out: list[Any] = values.tolist()
    back = np.asarray(json.loads(json.dumps(out)), dtype=np.float64).astype(np.float32)
    if back.shape != x32.shape or not np.array_equal(back, x32):  # cannot happen: a guard
        raise ValueError("example inputs do not read back as the values verified")
    return out


def folded_layers(net: Network) -> list[tuple[Array, Array]]:
    """(W', b') per Gemm, standardisation and batch norm folded in, float64."""
    p = net.params
    mean, std = net.stats["input.mean"], net.stats["input.std"]
    layers: list[tuple[Array, Array]] = []
    weights = [p[f"hidden.{l}.weight"] for l in range(net.n_hidden)] + [p["output.weight"]]
    for l, weight in enumerate(weights):
        w = weight
        b = p["output.bias"] if l == net.n_hidden else np.zeros(w.shape[1])
        if l == 0:  # (x - m) / s @ W + b  ==  x @ (W / s) + (b - (m / s) @ W)
            w, b = w / std[:, None], b - (mean / std) @ w
        if l < net.n_hidden:
            mu, var = net.layer_stats()[l]
            w, b = batchnorm.fold_into_linear(
                w, b, p[f"hidden.{l}.gamma"], p[f"hidden.{l}.beta"], mu, var, net.eps
            )
        layers.append((w, b))
    return layers


def _init(name: str, value: Array) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name)


def build(
    net: Network, metadata: dict[str, Any], folded: bool = True, drift: bool = True
) -> onnx.ModelProto:
    """The graph; with ``drift``, each hidden layer's batch-norm output is also a graph output
    (``drift.bn<l>``) and the metadata holds ``drift_reference``."""
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    bn_out = [drift_reference.tensor_name(f"bn{l}") if drift else None
              for l in range(net.n_hidden)]
    if folded:
        layers = folded_layers(net)
        a = INPUT
        for l, (w, b) in enumerate(layers):
            inits += [_init(f"gemm{l}.W", w), _init(f"gemm{l}.b", b)]
            z = "logits" if l == len(layers) - 1 else (bn_out[l] or f"gemm{l}.out")
            nodes.append(
                helper.make_node("Gemm", [a, f"gemm{l}.W", f"gemm{l}.b"], [z], name=f"gemm{l}")
            )
            if l < len(layers) - 1:
                a = f"relu{l}.out"
                nodes.append(helper.make_node("Relu", [z], [a], name=f"relu{l}"))
    else:
        p = net.params
        inits += [
            _init("input.mean", net.stats["input.mean"]),
            _init("input.std", net.stats["input.std"]),
        ]
        nodes += [
            helper.make_node("Sub", [INPUT, "input.mean"], ["centred"], name="standardise_sub"),
            helper.make_node(
                "Div", ["centred", "input.std"], ["standardised"], name="standardise_div"
            ),
        ]
        a = "standardised"
        for l, (mu, var) in enumerate(net.layer_stats()):
            names = [f"bn{l}.{k}" for k in ("gamma", "beta", "mean", "var")]
            inits += [_init(f"linear{l}.W", p[f"hidden.{l}.weight"])]
            inits += [
                _init(n, v)
                for n, v in zip(
                    names, (p[f"hidden.{l}.gamma"], p[f"hidden.{l}.beta"], mu, var), strict=True
                )
            ]
            nodes += [
                helper.make_node(
                    "MatMul", [a, f"linear{l}.W"], [f"linear{l}.out"], name=f"linear{l}"
                ),
                helper.make_node(
                    "BatchNormalization",
                    [f"linear{l}.out", *names],
                    [bn_out[l] or f"bn{l}.out"],
                    name=f"bn{l}",
                    epsilon=net.eps,
                    momentum=net.beta_avg,
                ),
                helper.make_node(
                    "Relu", [bn_out[l] or f"bn{l}.out"], [f"relu{l}.out"], name=f"relu{l}"
                ),
            ]
            a = f"relu{l}.out"
        inits += [_init("output.W", p["output.weight"]), _init("output.b", p["output.bias"])]
        nodes.append(
            helper.make_node("Gemm", [a, "output.W", "output.b"], ["logits"], name="output")
        )

    nodes += [
        helper.make_node("Softmax", ["logits"], [OUTPUT_PROBS], name="softmax", axis=1),
        helper.make_node("ArgMax", ["logits"], [OUTPUT_LABEL], name="argmax", axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "bnserve_folded" if folded else "bnserve_batchnorm",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", net.n_features])],
        [
            helper.make_tensor_value_info(OUTPUT_PROBS, TensorProto.FLOAT, ["N", net.n_classes]),
            helper.make_tensor_value_info(OUTPUT_LABEL, TensorProto.INT64, ["N"]),
            *(
                drift_reference.output_info(name, net.params[f"hidden.{l}.gamma"].shape[0])
                for l, name in enumerate(bn_out)
                if name is not None
            ),
        ],
        initializer=inits,
        doc_string="Batch-norm MLP in inference mode: each row's output depends on that row alone.",
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bnserve"
    )
    model.ir_version = IR_VERSION
    props = {**metadata, "format": FORMAT, "folded": "true" if folded else "false"}
    if drift:
        props[drift_reference.KEY] = drift_reference.for_network(
            net, metadata.get("feature_names")
        )
    helper.set_model_props(model, {k: _text(v) for k, v in sorted(props.items())})
    return model


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
