"""Fold every inference-mode BatchNormalization of an ONNX graph into a linear neighbour, exactly.

For each BatchNormalization, in graph order (equations in ``model_export/folding.py``):

1. after its producer, when the producer's output goes to this batch norm alone: Conv (any rank,
   groups, stride, dilation, padding; with or without bias), ConvTranspose (any groups), Gemm
   (transA/transB, alpha/beta, with or without C) and MatMul or MatMul+Add on a 2-D input, where the
   batch norm's channel axis (1) is the output feature axis;
2. else before its only reader, when that is exact: Gemm with transA=0 or MatMul on a 2-D input,
   or a Conv that does not pad (a padded Conv's zeros would not be shifted: never folded);
3. else it becomes one per-channel Mul+Add (it stays a BatchNormalization in inference mode if the
   rank of its input is unknown), and the report says why it was left.

A weight read by several nodes is never changed in place: each folded weight is a new tensor.
Before anything is changed, every batch norm is checked, and the pass refuses (``RefusedError``,
naming the node and the fix) one in training mode or with training outputs, one whose scale, bias,
mean or variance is not a constant, and one inside a control-flow subgraph.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper

from model_export import folding
from model_export.batchnorm import Array
from model_export.drift_reference import BatchNormStats
from model_export.onnx_graph import Graph, attr, set_attr

BN = "BatchNormalization"
_ROLES = ("scale (gamma)", "bias (beta)", "mean", "var")
TRAINING_FIX = ("exported in training mode: call model.eval() before torch.onnx.export (Keras: "
                "export the model called with training=False)")


class RefusedError(ValueError):
    """The graph cannot be folded into a model that serves each example on its own."""


@dataclass(frozen=True)
class Outcome:
    """What became of one batch norm: its statistics as recorded before folding, the name of its
    output, and where it went (``into`` as in the report; None when it was left in place)."""

    label: str
    output: str
    stats: BatchNormStats
    into: str | None

    @property
    def output_kept(self) -> bool:
        """Whether a tensor named ``output`` still carries the batch norm's output: not when it
        was folded into the following operator, whose input is now the batch norm's input."""
        return self.into is None or not self.into.startswith("following")


@dataclass
class FoldReport:
    batchnorms: int = 0
    into: Counter[str] = field(default_factory=Counter)
    left: list[str] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    outcomes: list[Outcome] = field(default_factory=list)  # graph order; not in as_dict()

    @property
    def folded(self) -> int:
        return sum(self.into.values())

    def _ordered(self) -> list[tuple[str, int]]:
        """Most frequent first; folds after an operator before folds into the following one."""
        return sorted(self.into.items(), key=lambda kv: (-kv[1], kv[0].startswith("following"),
                                                         kv[0]))

    def summary(self) -> str:
        where = ", ".join(f"{n} into {'the ' if k.startswith('following') else ''}{k}"
                          for k, n in self._ordered())
        return (f"folded {self.folded} of {self.batchnorms} {BN}"
                + (f" ({where})" if where else "")
                + f"; {len(self.left)} left; {self.nodes_before} -> {self.nodes_after} nodes")

    def as_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "batchnorms": self.batchnorms, "folded": self.folded,
                "into": dict(self._ordered()), "left": self.left,
                "nodes_before": self.nodes_before, "nodes_after": self.nodes_after}


def label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else (
        f"{node.op_type} (output {node.output[0]!r})")


@dataclass(frozen=True)
class _Norm:
    """One batch norm as the affine map s * x + t over channel axis 1."""

    node: onnx.NodeProto
    s: Array
    t: Array
    dtype: np.dtype[Any]
    stats: BatchNormStats


def check(graph: Graph) -> list[_Norm]:
    """Every batch norm of the main graph as (s, t), or RefusedError for the first broken one."""
    for node in graph.g.node:
        if _has_subgraph_bn(node):
            raise RefusedError(f"{label(node)} holds a {BN} inside a control-flow subgraph; "
                               "bnserve folds only the main graph: export without If/Loop/Scan "
                               "around batch norm")
    norms = []
    for node in graph.g.node:
        if node.op_type != BN or node.domain not in ("", "ai.onnx"):
            continue
        if attr(node, "training_mode", 0):
            raise RefusedError(f"{label(node)} has training_mode=1: it normalises with the "
                               f"statistics of each batch it is given. {TRAINING_FIX}")
        extra = [o for o in node.output[1:] if o]
        if extra:
            raise RefusedError(f"{label(node)} has {len(extra)} extra output(s) {extra} "
                               f"(running or saved statistics, only computed in training mode). "
                               f"{TRAINING_FIX}")
        values: list[NDArray[Any]] = []
        for role, name in zip(_ROLES, node.input[1:5], strict=True):
            value = graph.constant(name)
            if value is None:
                raise RefusedError(
                    f"{label(node)}: its {role} input {name!r} is not a constant, so what it "
                    "computes would change with the data; bnserve folds fixed statistics only. "
                    "Export the trained running mean and variance as initializers "
                    "(PyTorch: model.eval() before torch.onnx.export)")
            values.append(value)
        gamma, beta, mean, var = (np.asarray(v, dtype=np.float64).reshape(-1) for v in values)
        if (var < 0).any() or not all(np.isfinite(v).all() for v in (gamma, beta, mean, var)):
            raise RefusedError(f"{label(node)}: its statistics hold negative variances or "
                               "non-finite values; the file is corrupt or was not trained")
        eps = float(attr(node, "epsilon", 1e-5))
        s, t = folding.affine(gamma, beta, mean, var, eps)
        norms.append(_Norm(node, s, t, np.asarray(values[0]).dtype,
                           BatchNormStats(mean, var, gamma, beta, eps)))
    return norms


def _has_subgraph_bn(node: onnx.NodeProto) -> bool:
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            if any(n.op_type == BN or _has_subgraph_bn(n) for n in sub.node):
                return True
    return False


def fold_batchnorms(model: onnx.ModelProto) -> FoldReport:
    """Fold the batch norms of ``model`` in place; returns what was done."""
    graph = Graph(model)
    norms = check(graph)
    ranks, dtypes = _shapes(model)
    report = FoldReport(batchnorms=len(norms), nodes_before=len(model.graph.node))
    for norm in norms:
        rank = ranks.get(norm.node.input[0])
        what, output = label(norm.node), norm.node.output[0]  # before the node is removed
        into = _fold_after(graph, norm, rank) or _fold_before(graph, norm, rank)
        report.outcomes.append(Outcome(what, output, norm.stats, into))
        if into is not None:
            report.into[into] += 1
            continue
        dtype = dtypes.get(norm.node.input[0], norm.dtype)  # X's, which may differ from gamma's
        report.left.append(f"{label(norm.node)}: {_why_left(graph, norm.node, rank)}; "
                           + _leave(graph, norm, rank, dtype))
    graph.prune()
    del model.graph.value_info[:]  # shapes recorded before the rewrite may no longer hold
    report.nodes_after = len(model.graph.node)
    return report


def _shapes(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, np.dtype[Any]]]:
    """Rank and element type of every value shape inference can tell."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an invalid graph is caught by the checker later; ranks stay unknown
        return {}, {}
    ranks, dtypes = {}, {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
        if t.elem_type:
            dtypes[vi.name] = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type))
    return ranks, dtypes


def _weights(graph: Graph, node: onnx.NodeProto) -> tuple[NDArray[Any], NDArray[Any] | None] | None:
    """The constant weight (input 1) and optional constant bias (input 2) of a node, or None."""
    w = graph.constant(node.input[1]) if len(node.input) > 1 else None
    if w is None:
        return None
    if len(node.input) > 2 and node.input[2]:
        b = graph.constant(node.input[2])
        return None if b is None else (w, b)
    return w, None


def _set_inputs(graph: Graph, node: onnx.NodeProto, w: Array, b: Array,
                dtype: np.dtype[Any]) -> None:
    node.input[1] = graph.set_constant(node.input[1], w.astype(dtype))
    bias = graph.set_constant(node.input[1] + ".bias", b.astype(dtype))
    if len(node.input) > 2:
        node.input[2] = bias
    else:
        node.input.append(bias)


def _row_bias(c: NDArray[Any] | None, n: int) -> Array | None:
    """A Gemm C (or an Add's constant) as a per-feature [n] vector, if it is one (broadcast over
    the batch); None when it varies along the batch axis."""
    if c is None:
        return np.zeros(n)
    c64 = np.asarray(c, dtype=np.float64)
    if c64.ndim > 2 or (c64.ndim == 2 and c64.shape[0] != 1) or c64.size not in (1, n):
        return None
    return np.broadcast_to(c64.reshape(-1), (n,)).copy()


def _fold_after(graph: Graph, norm: _Norm, rank: int | None) -> str | None:
    bn = norm.node
    prod = graph.producer(bn.input[0])
    if prod is None or prod.domain not in ("", "ai.onnx"):
        return None
    if graph.only_reader(bn.input[0]) is not bn:
        return None
    op = prod.op_type
    if op in ("MatMul", "Add"):  # these rewire the graph themselves (a new or reused Add)
        ok = rank == 2 and _fold_after_matmul(graph, prod, bn, norm.s, norm.t)
        return ("MatMul" if op == "MatMul" else "MatMul+Add") if ok else None
    folders = {"Conv": _fold_after_conv, "ConvTranspose": _fold_after_conv,
               "Gemm": _fold_after_gemm}
    if op not in folders or not folders[op](graph, prod, norm.s, norm.t):
        return None
    prod.output[0] = bn.output[0]
    graph.remove_node(bn)
    return op


def _fold_after_conv(graph: Graph, conv: onnx.NodeProto, s: Array, t: Array) -> bool:
    found = _weights(graph, conv)
    if found is None:
        return False
    w, b = found
    w64, b64 = w.astype(np.float64), None if b is None else b.astype(np.float64)
    group = int(attr(conv, "group", 1))
    if conv.op_type == "Conv" and w.shape[0] == len(s):
        w2, b2 = folding.after_conv(w64, b64, s, t)
    elif conv.op_type == "ConvTranspose" and w.shape[1] * group == len(s):
        w2, b2 = folding.after_conv_transpose(w64, b64, s, t, group)
    else:
        return False
    _set_inputs(graph, conv, w2, b2, w.dtype)
    return True


def _fold_after_gemm(graph: Graph, gemm: onnx.NodeProto, s: Array, t: Array) -> bool:
    found = _weights(graph, gemm)
    if found is None:
        return False
    w, c = found
    trans_b = bool(attr(gemm, "transB", 0))
    b_kn = (w.T if trans_b else w).astype(np.float64)
    c_row = _row_bias(c, len(s))
    if b_kn.ndim != 2 or b_kn.shape[1] != len(s) or c_row is None:
        return False
    beta = float(attr(gemm, "beta", 1.0))
    w2, b2 = folding.after_matmul(b_kn, beta * c_row, s, t)
    _set_inputs(graph, gemm, w2.T if trans_b else w2, b2, w.dtype)
    set_attr(gemm, "beta", 1.0)
    return True


def _fold_after_matmul(graph: Graph, node: onnx.NodeProto, bn: onnx.NodeProto, s: Array,
                       t: Array) -> bool:
    """``x @ W`` or ``x @ W + c`` (c constant, per feature) followed by the batch norm."""
    matmul, c, data = node, None, ""
    if node.op_type == "Add":
        consts = [graph.constant(i) for i in node.input]
        if len(consts) != 2 or (consts[0] is None) == (consts[1] is None):
            return False
        c = consts[0] if consts[0] is not None else consts[1]
        data = node.input[1] if consts[0] is not None else node.input[0]
        found = graph.producer(data)
        if found is None or found.op_type != "MatMul" or graph.only_reader(data) is not node:
            return False
        matmul = found
    w = graph.constant(matmul.input[1])
    if w is None or w.ndim != 2 or w.shape[1] != len(s):
        return False
    c_row = _row_bias(c, len(s))
    if c_row is None:
        return False
    w2, b2 = folding.after_matmul(w.astype(np.float64), c_row, s, t)
    matmul.input[1] = graph.set_constant(matmul.input[1], w2.astype(w.dtype))
    bias = graph.set_constant(matmul.input[1] + ".bias", b2.astype(w.dtype))
    if node is matmul:  # a new Add carries the shift
        graph.add_node("Add", [bn.input[0], bias], [bn.output[0]], after=matmul)
    else:
        del node.input[:]
        node.input.extend([data, bias])
        node.output[0] = bn.output[0]
    graph.remove_node(bn)
    return True


def _pads(conv: onnx.NodeProto) -> bool:
    auto = attr(conv, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return auto not in ("NOTSET", "VALID") or any(attr(conv, "pads", []))


def _fold_before(graph: Graph, norm: _Norm, rank: int | None) -> str | None:
    bn, s, t = norm.node, norm.s, norm.t
    reader = graph.only_reader(bn.output[0])
    if reader is None or reader.domain not in ("", "ai.onnx") or reader.input[0] != bn.output[0]:
        return None
    op = reader.op_type
    found = _weights(graph, reader)
    if found is None:
        return None
    w, b = found
    w64 = w.astype(np.float64)
    b64 = None if b is None else b.astype(np.float64)
    if op == "Conv" and not _pads(reader):
        group = int(attr(reader, "group", 1))
        if w.shape[1] * group != len(s):
            return None
        w2, b2 = folding.before_conv(w64, b64, s, t, group)
        _set_inputs(graph, reader, w2, b2, w.dtype)
    elif op == "Gemm" and rank == 2 and not attr(reader, "transA", 0):
        trans_b = bool(attr(reader, "transB", 0))
        b_kn = w64.T if trans_b else w64
        c_row = _row_bias(b, b_kn.shape[1]) if b_kn.ndim == 2 else None
        if b_kn.ndim != 2 or b_kn.shape[0] != len(s) or c_row is None:
            return None
        alpha, beta = float(attr(reader, "alpha", 1.0)), float(attr(reader, "beta", 1.0))
        w2, shift = folding.before_matmul(b_kn, None, s, t)
        _set_inputs(graph, reader, w2.T if trans_b else w2, alpha * shift + beta * c_row,
                    w.dtype)
        set_attr(reader, "beta", 1.0)
    elif op == "MatMul" and rank == 2 and w.ndim == 2 and w.shape[0] == len(s):
        w2, shift = folding.before_matmul(w64, None, s, t)
        reader.input[1] = graph.set_constant(reader.input[1], w2.astype(w.dtype))
        out = reader.output[0]
        moved = graph.fresh(out)
        reader.output[0] = moved
        bias = graph.set_constant(reader.input[1] + ".bias", shift.astype(w.dtype))
        graph.add_node("Add", [moved, bias], [out], after=reader)
    else:
        return None
    reader.input[0] = bn.input[0]
    graph.remove_node(bn)
    return f"following {op}"


def _why_left(graph: Graph, bn: onnx.NodeProto, rank: int | None) -> str:
    reader = graph.only_reader(bn.output[0])
    if reader is not None and reader.op_type == "Conv" and _pads(reader):
        return ("in front of a Conv that pads its input (folding would not shift the padding "
                "zeros)")
    prod = graph.producer(bn.input[0])
    before = prod.op_type if prod is not None else "the graph input"
    readers = graph.consumers(bn.output[0])
    after = ", ".join(sorted({r.op_type for r in readers})) or "the graph output"
    return f"between {before} and {after}: no linear neighbour it folds into exactly"


def _leave(graph: Graph, norm: _Norm, rank: int | None, dtype: np.dtype[Any]) -> str:
    """Replace the batch norm by x * s + t per channel; keep it as is if the rank is unknown."""
    bn = norm.node
    if rank is None or rank < 2:
        return f"kept as {BN} in inference mode (the rank of its input is unknown)"
    shape = (len(norm.s),) + (1,) * (rank - 2)
    base = bn.name or bn.output[0]
    scale = graph.set_constant(base + ".scale", norm.s.reshape(shape).astype(dtype))
    shift = graph.set_constant(base + ".shift", norm.t.reshape(shape).astype(dtype))
    scaled = graph.fresh(base + ".scaled")
    mul = graph.add_node("Mul", [bn.input[0], scale], [scaled], after=bn)
    graph.add_node("Add", [scaled, shift], [bn.output[0]], after=mul)
    graph.remove_node(bn)
    return "replaced by one per-channel Mul+Add"
