"""A mutable view of an ONNX graph for rewriting: who produces and who reads each value, which
values are constants, fresh names, and removal of what nothing reads any more.

Constants are initializers, ``Constant`` nodes, and anything computed from constants alone by a
deterministic operator (exporters emit ``Identity`` of a weight, Caffe2-era models build weights
with ``ConstantOfShape``): those are evaluated on demand with ``onnx.reference``, once, under the
model's own opsets, so only the values a rewrite actually reads are ever materialised.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

# Operators whose output is not a function of their inputs, or that are not worth evaluating here.
_NOT_CONSTANT_FOLDABLE = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
    "Bernoulli", "If", "Loop", "Scan", "SequenceConstruct",
})


def attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


class Graph:
    """The main graph of ``model``, edited in place through this object."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = model.graph
        self.opsets = list(model.opset_import)
        self.initializers: dict[str, onnx.TensorProto] = {i.name: i for i in self.g.initializer}
        self._values: dict[str, NDArray[Any] | None] = {}
        self._names = {n for node in self.g.node for n in (*node.input, *node.output)}
        self._names |= set(self.initializers) | {v.name for v in self.g.input}
        self._counter = itertools.count()

    # ------------------------------------------------------------------ structure

    def producer(self, name: str) -> onnx.NodeProto | None:
        return next((n for n in self.g.node if name in n.output), None)

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.g.node if name in n.input]

    def is_graph_output(self, name: str) -> bool:
        return any(o.name == name for o in self.g.output)

    def only_reader(self, name: str) -> onnx.NodeProto | None:
        """The single node that reads ``name``, if exactly one node does and it is not a graph
        output (so a rewrite that changes the value is seen by nobody else)."""
        readers = self.consumers(name)
        if len(readers) != 1 or self.is_graph_output(name):
            return None
        if Counter(readers[0].input)[name] != 1:
            return None
        return readers[0]

    def fresh(self, base: str) -> str:
        while True:
            name = f"{base}.bnserve{next(self._counter)}"
            if name not in self._names:
                self._names.add(name)
                return name

    # ------------------------------------------------------------------ constants

    def constant(self, name: str) -> NDArray[Any] | None:
        """The value of ``name`` if it is a constant, else None."""
        if name == "":
            return None
        if name not in self._values:
            self._values[name] = self._evaluate(name)
        return self._values[name]

    def _evaluate(self, name: str) -> NDArray[Any] | None:
        if name in self.initializers:
            if any(v.name == name for v in self.g.input):  # an overridable default, not a const
                return None  # (the importer first moves IR < 4 models' weights out of the inputs)
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in _NOT_CONSTANT_FOLDABLE:
            return None
        inputs = [self.constant(i) if i else None for i in node.input]
        if any(v is None for v, i in zip(inputs, node.input, strict=True) if i):
            return None
        values = self._run_node(node, {i: v for i, v in zip(node.input, inputs, strict=True) if i})
        for out, value in zip(node.output, values, strict=False):
            self._values[out] = np.asarray(value)
        return self._values.get(name)

    def _run_node(self, node: onnx.NodeProto, feeds: dict[str, Any]) -> list[Any]:
        inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in feeds.items()]
        outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
        graph = helper.make_graph([node], "constant", [], outputs, inits)
        model = helper.make_model(graph, opset_imports=self.opsets)
        return list(ReferenceEvaluator(model).run(None, {}))

    def set_constant(self, base: str, value: NDArray[Any]) -> str:
        """A new initializer holding ``value`` under a fresh name: never overwrites a tensor that
        other nodes may read."""
        name = self.fresh(base)
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.g.initializer.append(tensor)
        self.initializers[name] = tensor
        self._values[name] = value
        return name

    # ------------------------------------------------------------------ edits

    def add_node(
        self, op: str, inputs: list[str], outputs: list[str], after: onnx.NodeProto,
        **attrs: Any,
    ) -> onnx.NodeProto:
        node = helper.make_node(op, inputs, outputs, name=self.fresh(after.name or op), **attrs)
        index = next(i for i, n in enumerate(self.g.node) if n is after)
        self.g.node.insert(index + 1, node)  # protobuf stores a copy: return the stored one
        self._names.update(outputs)
        stored: onnx.NodeProto = self.g.node[index + 1]
        return stored

    def remove_node(self, node: onnx.NodeProto) -> None:
        index = next(i for i, n in enumerate(self.g.node) if n is node)
        del self.g.node[index]

    def rename_value(self, old: str, new: str) -> None:
        """Every reference to ``old`` (node inputs and outputs, graph inputs and outputs) becomes
        ``new``."""
        for node in self.g.node:
            for seq in (node.input, node.output):
                for i, name in enumerate(seq):
                    if name == old:
                        seq[i] = new
        for vi in (*self.g.input, *self.g.output, *self.g.value_info):
            if vi.name == old:
                vi.name = new
        self._names.add(new)
        if old in self._values:
            self._values[new] = self._values.pop(old)

    def prune(self) -> None:
        """Remove nodes whose outputs nothing reads, then initializers nothing reads."""
        needed = {o.name for o in self.g.output}
        keep: list[onnx.NodeProto] = []
        for node in reversed(self.g.node):
            if any(o in needed for o in node.output):
                keep.append(node)
                needed.update(i for i in node.input if i)
                needed.update(_subgraph_inputs(node))
        if len(keep) != len(self.g.node):
            kept = list(reversed(keep))
            del self.g.node[:]
            self.g.node.extend(kept)
        unused = [t for t in self.g.initializer if t.name not in needed]
        for t in unused:
            self.g.initializer.remove(t)
            self.initializers.pop(t.name, None)
        graph_inputs = [v for v in self.g.input if v.name in self.initializers or v.name in needed]
        if len(graph_inputs) != len(self.g.input):
            del self.g.input[:]
            self.g.input.extend(graph_inputs)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a control-flow node's subgraphs read from the enclosing scope (conservatively: every
    input of every node inside them)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in graphs:
            for inner in sub.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names
