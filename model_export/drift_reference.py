"""The drift reference an exported model carries: what its inputs and batch-norm outputs should
look like on training-like data, and the extra graph outputs that let the service watch them.

Metadata key ``drift_reference`` (a JSON string; format ``bnserve-drift/1``)::

    {"format": "bnserve-drift/1",
     "groups": [{"name": "input", "kind": "input", "tensor": "features", "channel_names": [...],
                 "mean": [...], "std": [...]},
                {"name": "bn0", "kind": "batchnorm", "tensor": "drift.bn0", "channel_names": null,
                 "mean": [...], "std": [...],
                 "bn": {"mu": [...], "var": [...], "gamma": [...], "beta": [...], "eps": 1e-05}},
                ...]}

A batch norm's output z~ = gamma * (z - mu) / sqrt(var + eps) + beta, on data whose z has mean mu
and variance var (the statistics it was trained with), has per channel

    mean  beta,     std  |gamma| * sqrt(var / (var + eps)),

which is what its group expects. Channels are axis 1; statistics pool the examples and every axis
after it, as batch norm does. Each watched batch norm's output is an extra graph output named
``drift.<group name>``; the service hides every ``drift.*`` output from its clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from model_export import batchnorm
from model_export.batchnorm import Array
from model_export.mlp import Network
from model_export.onnx_graph import Graph

if TYPE_CHECKING:
    from model_export.onnx_fold import Outcome

KEY = "drift_reference"
FORMAT = "bnserve-drift/1"
PREFIX = "drift."
INPUT_GROUP = "input"


def tensor_name(group: str) -> str:
    """The graph output that carries batch-norm group ``group``."""
    return PREFIX + group


@dataclass(frozen=True)
class BatchNormStats:
    """One inference-mode batch norm's constants, per channel, float64."""

    mu: Array
    var: Array
    gamma: Array
    beta: Array
    eps: float

    @property
    def expected_mean(self) -> Array:
        return self.beta

    @property
    def expected_std(self) -> Array:
        std: Array = np.abs(self.gamma) * np.sqrt(self.var / (self.var + self.eps))
        return std


def _floats(a: Array) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float64).reshape(-1)]


def input_group(mean: Array, std: Array, names: Sequence[str] | None) -> dict[str, Any]:
    return {"name": INPUT_GROUP, "kind": "input", "tensor": "features",
            "channel_names": None if names is None else list(names),
            "mean": _floats(mean), "std": _floats(std)}


def batchnorm_group(name: str, stats: BatchNormStats) -> dict[str, Any]:
    return {"name": name, "kind": "batchnorm", "tensor": tensor_name(name),
            "channel_names": None,
            "mean": _floats(stats.expected_mean), "std": _floats(stats.expected_std),
            "bn": {"mu": _floats(stats.mu), "var": _floats(stats.var),
                   "gamma": _floats(stats.gamma), "beta": _floats(stats.beta),
                   "eps": float(stats.eps)}}


def reference(groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {"format": FORMAT, "groups": groups}


# ---------------------------------------------------------------- bnserve's own network


def layer_stats(net: Network) -> list[BatchNormStats]:
    """Per hidden layer, the batch norm as exported (the network's chosen estimator)."""
    p = net.params
    return [BatchNormStats(mu, var, p[f"hidden.{l}.gamma"], p[f"hidden.{l}.beta"], net.eps)
            for l, (mu, var) in enumerate(net.layer_stats())]


def for_network(net: Network, feature_names: Sequence[str] | None) -> dict[str, Any]:
    """The input group (training standardisation) and one group per hidden layer."""
    groups = [input_group(net.stats["input.mean"], net.stats["input.std"], feature_names)]
    groups += [batchnorm_group(f"bn{l}", s) for l, s in enumerate(layer_stats(net))]
    return reference(groups)


def network_bn_outputs(net: Network, x: Array) -> dict[str, Array]:
    """The numpy inference forward's z~ of every hidden layer (before ReLU), by output name."""
    p = net.params
    a = net.standardise(x)
    out: dict[str, Array] = {}
    for l, s in enumerate(layer_stats(net)):
        z_tilde = batchnorm.forward_infer(a @ p[f"hidden.{l}.weight"], s.gamma, s.beta, s.mu,
                                          s.var, s.eps)
        out[tensor_name(f"bn{l}")] = z_tilde
        a = np.maximum(z_tilde, 0.0)
    return out


def output_info(name: str, channels: int | None, elem_type: int = TensorProto.FLOAT
                ) -> onnx.ValueInfoProto:
    """A drift output's declaration: [N, C] for bnserve's MLP, shape left open otherwise."""
    shape: list[str | int] | None = None if channels is None else ["N", channels]
    return helper.make_tensor_value_info(name, elem_type, shape)


# ---------------------------------------------------------------- imported ONNX models


@dataclass(frozen=True)
class Exposed:
    """The batch norms an imported graph now exposes, and those it cannot."""

    groups: list[dict[str, Any]]
    originals: dict[str, str]  # drift output -> the original file's tensor holding the same values
    monitored: dict[str, str]  # drift output -> the batch norm, as the fold report names it
    not_monitored: list[str]  # "not monitored: ..." lines, for the log and the fold report


def expose_batchnorms(model: onnx.ModelProto, outcomes: Sequence[Outcome]) -> Exposed:
    """After folding: make each batch norm's output, where a tensor still carries it, a graph
    output ``drift.bn<i>`` (i counts every batch norm in graph order); return their groups.

    A batch norm folded into its producer, or left in place, still has its output tensor (the
    folded producer or the Mul+Add writes it): it is renamed (or, if it is a graph output
    already, copied by an Identity). One folded into the following operator has none."""
    graph = Graph(model)
    types = _inferred(model)
    groups: list[dict[str, Any]] = []
    originals: dict[str, str] = {}
    monitored: dict[str, str] = {}
    skipped: list[str] = []
    for i, out in enumerate(outcomes):
        name = f"bn{i}"
        tensor = tensor_name(name)
        why = _why_not(graph, out, types, tensor)
        if why is not None:
            skipped.append(f"not monitored: {out.label}: {why}")
            continue
        info = onnx.ValueInfoProto()
        info.CopyFrom(types.get(out.output) or output_info(out.output, None))
        info.name = tensor
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and dims:
            dims[0].Clear()
            dims[0].dim_param = "N"  # the batch, whatever inference made of it
        if graph.is_graph_output(out.output):
            producer = graph.producer(out.output)
            assert producer is not None  # checked by _why_not
            graph.add_node("Identity", [out.output], [tensor], after=producer)
        else:
            graph.rename_value(out.output, tensor)
        model.graph.output.append(info)
        groups.append(batchnorm_group(name, out.stats))
        originals[tensor] = out.output
        monitored[tensor] = out.label
    return Exposed(groups, originals, monitored, skipped)


def _why_not(graph: Graph, out: Outcome, types: dict[str, onnx.ValueInfoProto],
             tensor: str) -> str | None:
    if not out.output_kept:
        return (f"folded into the {out.into.removeprefix('following ') if out.into else ''}"
                " that reads it, so no tensor carries its output any more")
    if graph.producer(out.output) is None:
        return f"its output {out.output!r} is no longer computed"
    if graph.producer(tensor) is not None or tensor in graph.initializers:
        return f"the graph already has a tensor named {tensor!r}"
    elem = types[out.output].type.tensor_type.elem_type if out.output in types else 0
    if elem not in (0, TensorProto.FLOAT):
        return f"its output is {TensorProto.DataType.Name(elem)}, not float32"
    return None


def _inferred(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every value's type and shape that shape inference can tell (empty if it fails)."""
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # an invalid graph is caught by the checker later
        return {}
    return {vi.name: vi for vi in (*g.value_info, *g.output) if vi.type.HasField("tensor_type")}
