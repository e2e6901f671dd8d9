"""Property tests of batch-norm folding (issue 9): random Conv, ConvTranspose, Gemm and MatMul
graphs with batch norms after them, before them and in chains, folded by
``onnx_fold.fold_batchnorms``.

Every generated graph (ONNX opset 17, IR 8, float32) is checked by ``onnx.checker`` (full) before it
is used, folded on a deep copy, and then:

1. ``onnx.checker`` (full_check) accepts the folded model;
2. its outputs, run by ONNX Runtime, equal the ORIGINAL graph's outputs run by ONNX Runtime and
   run by ``onnx.reference.ReferenceEvaluator``. Both ONNX Runtime sessions have every graph
   optimisation off (``ORT_DISABLE_ALL``), so ORT's own Conv+BN fusion can stand in neither for the
   original nor for the fold;
3. the report counts what must have happened (``into`` exactly, ``left``, the node counts), and the
   graph agrees: no BatchNormalization left, one Mul (of a Mul+Add) per batch norm left;
4. the original model is byte for byte what it was: folding the copy changed nothing in it.

Tolerance, absolute per output: ``RTOL * max(1, max |reference|)`` with RTOL = 1e-4. Folding moves
the batch-norm scale into the weights before the float32 sums instead of after them, so folded and
original differ by a few float32 ulps (6e-8) of the sums' terms: at most ~100 terms per output here
and two layers, under 1e-5 of the output's magnitude (the ``max(1, .)`` keeps outputs near zero
from asking for less than float32 gives). The statistics drawn (|gamma| from 3e-3 to 3, variances
from 1e-3 to 100, eps from 1e-5 to 1e-3, non-zero means and betas) make outputs up to ~100, which
the scaling absorbs. Over 6,500 random graphs (500 per property) the largest difference seen
was 8.4e-7 in these units, 120 times below the tolerance. A wrong fold moves outputs by the size
of a batch-norm parameter, 1e-2 relative or more: the negative controls at the end show each check
failing on a wrong fold (the shift forgotten, eps ignored, a ConvTranspose scaled on the wrong
axis, a batch norm folded into a padded Conv, a shared weight scaled in place).

The numbers of each graph come from one numpy generator seeded by hypothesis; the structure
(ranks, groups, strides, paddings, flags) is drawn by hypothesis itself so that it shrinks. Runs are
derandomized and use no example database, so CI sees the same examples every time; 100 examples
per property take about 15 s on two cores.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from model_export import folding
from model_export.onnx_fold import BN, FoldReport, fold_batchnorms

OPSET, IR_VERSION = 17, 8
BATCH = 3  # examples per run; every generated graph has a dynamic batch dimension "N"
RTOL = 1e-4
F32 = NDArray[np.float32]

PROPERTY = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Gemm's C: absent, a scalar, [1], [N], or [1, N] (all broadcast over the batch).
C_MODES = ("absent", "scalar", "[1]", "[N]", "[1, N]")
SCALARS = (1.0, 0.5, -1.25, 3.0)  # Gemm alpha and beta
EXACT_PADDING = ("absent", "zeros", "VALID")  # a Conv that does not pad
PADDING = ("pads", "SAME_UPPER", "SAME_LOWER")  # a Conv that pads (asymmetric pads included)


# --------------------------------------------------------------------------- building graphs


SOURCES = ("initializer", "Constant node", "Identity of an initializer")


class Builder:
    """A float32 graph under construction; its numbers come from one seeded generator, and its
    constants are written the way ``source`` says (exporters use all three)."""

    def __init__(self, seed: int, source: str = "initializer") -> None:
        self.rng = np.random.default_rng(seed)
        self.label = f"seed {seed}, constants as {source}"
        self.source = source
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.feeds: dict[str, F32] = {}
        self._ids = itertools.count()

    def input(self, shape: list[int | str]) -> str:
        """A graph input; "N" is the batch dimension."""
        name = f"x{next(self._ids)}"
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        concrete = [BATCH if d == "N" else int(d) for d in shape]
        self.feeds[name] = self.rng.normal(size=concrete).astype(np.float32)
        return name

    def const(self, base: str, value: NDArray[Any]) -> str:
        name = f"{base}{next(self._ids)}"
        tensor = numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
        if self.source == "Constant node":
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        elif self.source == "Identity of an initializer":
            tensor.name = name + ".raw"
            self.inits.append(tensor)
            self.nodes.append(helper.make_node("Identity", [tensor.name], [name]))
        else:
            self.inits.append(tensor)
        return name

    def weight(self, shape: tuple[int, ...] | list[int], fan_in: int) -> str:
        return self.const("W", self.rng.normal(size=tuple(shape)) / np.sqrt(max(fan_in, 1)))

    def vector(self, shape: tuple[int, ...] | list[int]) -> str:
        return self.const("b", self.rng.normal(size=tuple(shape)))

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        out = f"{op_type.lower()}{next(self._ids)}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def bn(self, x: str, channels: int) -> str:
        """An inference-mode batch norm with non-trivial statistics over axis 1."""
        r = self.rng
        gamma = r.choice([-1.0, 1.0], channels) * 10.0 ** r.uniform(-2.5, 0.5, channels)
        beta, mean = r.normal(size=channels), r.normal(size=channels)
        var = 10.0 ** r.uniform(-3.0, 2.0, channels)
        eps = float(10.0 ** r.uniform(-5.0, -3.0))
        stats = [self.const(n, v) for n, v in
                 (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))]
        if r.random() < 0.2:
            return self.op(BN, [x, *stats])  # ONNX's default epsilon, 1e-5
        return self.op(BN, [x, *stats], epsilon=eps)

    def model(self, outputs: list[str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "random", self.inputs,
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits,
        )
        return typed_model(graph)


def typed_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    """An opset-17, IR-8 model of ``graph``, its outputs' shapes filled in by shape inference
    (nothing else of the inference is kept), checked in full."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    onnx.checker.check_model(model, full_check=True)  # the generator's own sanity
    return model


@dataclass
class Case:
    """One generated graph and what folding it must report."""

    what: str  # the drawn structure and seed: what hypothesis prints for a failing example
    model: onnx.ModelProto = field(repr=False)
    feeds: dict[str, F32] = field(repr=False)
    into: Counter[str] = field(default_factory=Counter)
    left: int = 0


@st.composite
def builders(draw: st.DrawFn, sources: tuple[str, ...] = SOURCES) -> Builder:
    return Builder(draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from(sources)))


@dataclass(frozen=True)
class ConvShape:
    c_in: int
    c_out: int
    sizes: list[int]  # spatial input sizes
    kernel: list[int]
    attrs: dict[str, Any]

    @property
    def group(self) -> int:
        return int(self.attrs["group"])

    def __str__(self) -> str:
        attrs = ", ".join(f"{k}={v}" for k, v in self.attrs.items())
        return f"Conv(c_in={self.c_in}, c_out={self.c_out}, sizes={self.sizes}, {attrs})"


@st.composite
def conv_shapes(draw: st.DrawFn, padding: tuple[str, ...], max_rank: int = 3) -> ConvShape:
    """Conv geometry: rank 1-3, groups dividing both channel counts (depthwise included),
    stride, dilation and the padding modes given."""
    rank = draw(st.integers(1, max_rank))
    group = draw(st.integers(1, 3))
    c_in, c_out = group * draw(st.integers(1, 2)), group * draw(st.integers(1, 3))
    mode = draw(st.sampled_from(padding))
    per_dim = st.lists(st.integers(1, 2), min_size=rank, max_size=rank)
    kernel = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    strides = draw(per_dim)
    # ONNX Runtime refuses dilations with auto_pad SAME_* ("Dilation not supported")
    dilations = [1] * rank if mode.startswith("SAME") else draw(per_dim)
    room = st.integers(0, 3 if rank < 3 else 1)
    sizes = [d * (k - 1) + 1 + draw(room) for k, d in zip(kernel, dilations, strict=True)]
    attrs: dict[str, Any] = {"kernel_shape": kernel, "strides": strides, "dilations": dilations,
                             "group": group}
    if mode == "zeros":
        attrs["pads"] = [0] * (2 * rank)
    elif mode == "pads":
        attrs["pads"] = draw(st.lists(st.integers(0, 2), min_size=2 * rank, max_size=2 * rank)
                             .filter(any))
    elif mode != "absent":
        attrs["auto_pad"] = mode
    return ConvShape(c_in, c_out, sizes, kernel, attrs)


def add_conv(b: Builder, x: str, shape: ConvShape, bias: bool) -> str:
    w = b.weight([shape.c_out, shape.c_in // shape.group, *shape.kernel],
                 shape.c_in // shape.group * int(np.prod(shape.kernel)))
    return b.op("Conv", [x, w, *([b.vector([shape.c_out])] if bias else [])], **shape.attrs)


def add_gemm(b: Builder, x: str, k: int, n: int, trans_b: bool, alpha: float, beta: float,
             c_mode: str, **attrs: Any) -> str:
    w = b.weight([n, k] if trans_b else [k, n], k)
    c_shape = {"scalar": [], "[1]": [1], "[N]": [n], "[1, N]": [1, n]}
    inputs = [x, w] + ([] if c_mode == "absent" else [b.vector(c_shape[c_mode])])
    return b.op("Gemm", inputs, transB=int(trans_b), alpha=alpha, beta=beta, **attrs)


LINEARS = ("Gemm", "MatMul", "MatMul+Add")


def add_linear(b: Builder, x: str, kind: str, k: int, n: int) -> str:
    """[batch, k] -> [batch, n] as PyTorch's exporter writes a Linear (or a bare MatMul)."""
    if kind == "Gemm":
        return add_gemm(b, x, k, n, trans_b=True, alpha=1.0, beta=1.0, c_mode="[N]")
    z = b.op("MatMul", [x, b.weight([k, n], k)])
    return b.op("Add", [z, b.vector([n])]) if kind == "MatMul+Add" else z


# --------------------------------------------------------------------------- the checks


def ort_run(model: onnx.ModelProto, feeds: Mapping[str, NDArray[Any]]) -> list[NDArray[Any]]:
    """ONNX Runtime on CPU with every graph optimisation off, one thread."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, feeds)]


def ungroup_conv_transposes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every grouped ConvTranspose written with group=1 and a block-diagonal
    weight. onnx.reference (1.23) cannot run a grouped ConvTranspose: it slices W [C_in, M/group,
    k...] by output channels and fails on the shapes. ONNX Runtime runs the untouched original,
    so a wrong rewrite here could not pass: the two references would disagree."""
    model = copy.deepcopy(model)
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type != "ConvTranspose" or group == 1:
            continue
        w = constant_value(model, node.input[1])
        c_per_group, m_per_group = w.shape[0] // group, w.shape[1]
        full = np.zeros((w.shape[0], m_per_group * group, *w.shape[2:]), w.dtype)
        for g in range(group):
            rows, cols = slice(g * c_per_group, (g + 1) * c_per_group), slice(
                g * m_per_group, (g + 1) * m_per_group)
            full[rows, cols] = w[rows]
        node.input[1] += ".ungrouped"
        model.graph.initializer.append(numpy_helper.from_array(full, node.input[1]))
        next(a for a in node.attribute if a.name == "group").i = 1
    return model


def constant_value(model: onnx.ModelProto, name: str) -> NDArray[Any]:
    """The value of a constant written as the Builder writes them."""
    init = next((t for t in model.graph.initializer if t.name == name), None)
    if init is not None:
        return numpy_helper.to_array(init)
    node = node_producing(model, name)
    if node.op_type == "Identity":
        return constant_value(model, node.input[0])
    assert node.op_type == "Constant", node
    return numpy_helper.to_array(node.attribute[0].t)


def definition(model: onnx.ModelProto, name: str) -> bytes:
    """How ``name`` is defined: its initializer, or its producer and what that producer reads."""
    init = next((t for t in model.graph.initializer if t.name == name), None)
    if init is not None:
        data: bytes = init.SerializeToString()
        return data
    if any(v.name == name for v in model.graph.input):
        return name.encode()
    node = node_producing(model, name)
    head: bytes = node.SerializeToString()
    return head + b"".join(definition(model, i) for i in node.input if i)


def scaled_error(got: NDArray[Any], ref: NDArray[Any]) -> float:
    """max |got - ref| in units of max(1, max |ref|): the tolerance is RTOL in these units."""
    ref64 = np.asarray(ref, dtype=np.float64)
    diff = np.abs(np.asarray(got, dtype=np.float64) - ref64).max()
    return float(diff / max(1.0, float(np.abs(ref64).max())))


def assert_same_outputs(original: onnx.ModelProto, folded: onnx.ModelProto,
                        feeds: dict[str, F32]) -> float:
    """Folded (ORT) against the original in ORT and in onnx.reference; the worst scaled error."""
    names = [o.name for o in original.graph.output]
    assert [o.name for o in folded.graph.output] == names
    got = ort_run(folded, feeds)
    evaluator = ReferenceEvaluator(ungroup_conv_transposes(original))
    references = {
        "ONNX Runtime": ort_run(original, feeds),
        "onnx.reference": [np.asarray(r) for r in evaluator.run(None, feeds)],
    }
    worst = 0.0
    for runner, refs in references.items():
        for name, g, r in zip(names, got, refs, strict=True):
            assert g.shape == r.shape, f"{name}: folded {g.shape} vs original {r.shape} ({runner})"
            err = scaled_error(g, r)
            assert err <= RTOL, (f"{name}: folded vs original in {runner}: max |d| = {err:.2e} x "
                                 f"max(1, max |ref|) > {RTOL}")
            worst = max(worst, err)
    return worst


def fold_and_check(case: Case) -> tuple[onnx.ModelProto, FoldReport]:
    original = case.model
    before = original.SerializeToString()
    folded = copy.deepcopy(original)
    report = fold_batchnorms(folded)
    assert original.SerializeToString() == before, "folding the copy changed the original model"
    onnx.checker.check_model(folded, full_check=True)
    assert_same_outputs(original, folded, case.feeds)

    ops_before = Counter(n.op_type for n in original.graph.node)
    ops = Counter(n.op_type for n in folded.graph.node)
    assert report.batchnorms == ops_before[BN]
    assert report.into == case.into, report.summary()
    assert len(report.left) == case.left, report.left
    assert ops[BN] == 0, "every batch norm here has a known rank: folded or Mul+Add"
    assert ops["Mul"] == ops_before["Mul"] + case.left, "one Mul+Add per batch norm left"
    assert (report.nodes_before, report.nodes_after) == (len(original.graph.node),
                                                         len(folded.graph.node))
    return folded, report


def node_producing(model: onnx.ModelProto, output: str) -> onnx.NodeProto:
    node: onnx.NodeProto = next(n for n in model.graph.node if output in n.output)
    return node


def assert_reader_untouched(original: onnx.ModelProto, folded: onnx.ModelProto,
                            feeds: dict[str, F32], output: str) -> None:
    """The node computing ``output`` (not followed by a batch norm) reads the same weight bytes
    and computes the same value, bit for bit."""
    node = node_producing(folded, output)
    assert list(node.input) == list(node_producing(original, output).input)
    for name in node.input[1:]:
        assert definition(folded, name) == definition(original, name), name
    index = [o.name for o in original.graph.output].index(output)
    assert np.array_equal(ort_run(folded, feeds)[index], ort_run(original, feeds)[index])


# --------------------------------------------------------------------------- batch norm after


@st.composite
def conv_then_bn(draw: st.DrawFn) -> Case:
    shape = draw(conv_shapes(EXACT_PADDING + PADDING))
    bias = draw(st.booleans())
    b = draw(builders())
    x = b.input(["N", shape.c_in, *shape.sizes])
    y = b.bn(add_conv(b, x, shape, bias), shape.c_out)
    return Case(f"{shape} bias={bias} -> BN, {b.label}", b.model([y]), b.feeds,
                Counter({"Conv": 1}))


@st.composite
def conv_transpose_then_bn(draw: st.DrawFn) -> Case:
    rank = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    c_in, c_out = group * draw(st.integers(1, 2)), group * draw(st.integers(1, 3))
    dims = st.lists(st.integers(1, 3), min_size=rank, max_size=rank)
    kernel, strides = draw(dims), draw(dims)
    dilations = draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank))
    output_padding = [draw(st.integers(0, s - 1)) for s in strides]
    sizes = [draw(st.integers(2, 4 if rank < 3 else 2)) for _ in range(rank)]
    begin, end = [], []  # at most 1 each, leaving an output of at least 1
    for n, k, s, d, p in zip(sizes, kernel, strides, dilations, output_padding, strict=True):
        room = s * (n - 1) + p + d * (k - 1)
        begin.append(draw(st.integers(0, min(1, room))))
        end.append(draw(st.integers(0, min(1, room - begin[-1]))))
    pads = begin + end
    bias = draw(st.booleans())
    b = draw(builders())
    x = b.input(["N", c_in, *sizes])
    w = b.weight([c_in, c_out // group, *kernel], c_in // group * int(np.prod(kernel)))
    z = b.op("ConvTranspose", [x, w, *([b.vector([c_out])] if bias else [])], group=group,
             kernel_shape=kernel, strides=strides, dilations=dilations, pads=pads,
             output_padding=output_padding)
    y = b.bn(z, c_out)
    what = (f"ConvTranspose(c_in={c_in}, c_out={c_out}, group={group}, sizes={sizes}, "
            f"kernel={kernel}, strides={strides}, dilations={dilations}, pads={pads}, "
            f"output_padding={output_padding}, bias={bias}) -> BN, {b.label}")
    return Case(what, b.model([y]), b.feeds, Counter({"ConvTranspose": 1}))


@st.composite
def gemm_then_bn(draw: st.DrawFn) -> Case:
    k, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    trans_a, trans_b = draw(st.booleans()), draw(st.booleans())
    alpha, beta = draw(st.sampled_from(SCALARS)), draw(st.sampled_from(SCALARS))
    c_mode = draw(st.sampled_from(C_MODES))
    b = draw(builders())
    x = b.input([k, "N"] if trans_a else ["N", k])
    z = add_gemm(b, x, k, n, trans_b, alpha, beta, c_mode, transA=int(trans_a))
    what = (f"Gemm(k={k}, n={n}, transA={trans_a}, transB={trans_b}, alpha={alpha}, "
            f"beta={beta}, C {c_mode}) -> BN, {b.label}")
    return Case(what, b.model([b.bn(z, n)]), b.feeds, Counter({"Gemm": 1}))


@st.composite
def matmul_then_bn(draw: st.DrawFn) -> Case:
    k, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    add = draw(st.sampled_from(("none", "Add(z, c)", "Add(c, z)")))
    c_mode = draw(st.sampled_from(C_MODES[1:]))  # the Add's constant: scalar, [1], [N], [1, N]
    b = draw(builders())
    z = b.op("MatMul", [b.input(["N", k]), b.weight([k, n], k)])
    if add != "none":
        c = b.vector({"scalar": [], "[1]": [1], "[N]": [n], "[1, N]": [1, n]}[c_mode])
        z = b.op("Add", [z, c] if add == "Add(z, c)" else [c, z])
    into = "MatMul" if add == "none" else "MatMul+Add"
    what = f"MatMul(k={k}, n={n}) {add}{f' c {c_mode}' if add != 'none' else ''} -> BN"
    return Case(f"{what}, {b.label}", b.model([b.bn(z, n)]), b.feeds, Counter({into: 1}))


@PROPERTY
@given(conv_then_bn())
def test_bn_after_conv_folds_into_the_conv(case: Case) -> None:
    fold_and_check(case)


@PROPERTY
@given(conv_transpose_then_bn())
def test_bn_after_conv_transpose_folds_into_it(case: Case) -> None:
    fold_and_check(case)


@PROPERTY
@given(gemm_then_bn())
def test_bn_after_gemm_folds_into_the_gemm(case: Case) -> None:
    fold_and_check(case)


@PROPERTY
@given(matmul_then_bn())
def test_bn_after_matmul_or_matmul_add_folds_into_it(case: Case) -> None:
    fold_and_check(case)


# --------------------------------------------------------------------------- batch norm before


@st.composite
def bn_then_linear(draw: st.DrawFn) -> Case:
    k, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    op = draw(st.sampled_from(("Gemm", "MatMul")))
    trans_b = draw(st.booleans())
    alpha, beta = draw(st.sampled_from(SCALARS)), draw(st.sampled_from(SCALARS))
    c_mode = draw(st.sampled_from(C_MODES))
    b = draw(builders())
    x = b.bn(b.input(["N", k]), k)
    if op == "Gemm":
        y = add_gemm(b, x, k, n, trans_b, alpha, beta, c_mode)
        what = (f"BN -> Gemm(k={k}, n={n}, transB={trans_b}, alpha={alpha}, beta={beta}, "
                f"C {c_mode}), {b.label}")
    else:
        y = b.op("MatMul", [x, b.weight([k, n], k)])
        what = f"BN -> MatMul(k={k}, n={n}), {b.label}"
    return Case(what, b.model([y]), b.feeds, Counter({f"following {op}": 1}))


@st.composite
def bn_then_conv(draw: st.DrawFn, padding: tuple[str, ...]) -> Case:
    shape = draw(conv_shapes(padding))
    bias = draw(st.booleans())
    b = draw(builders())
    x = b.bn(b.input(["N", shape.c_in, *shape.sizes]), shape.c_in)
    y = add_conv(b, x, shape, bias)
    padded = padding == PADDING
    return Case(f"BN -> {shape} bias={bias}, {b.label}", b.model([y]), b.feeds,
                Counter() if padded else Counter({"following Conv": 1}), left=int(padded))


@PROPERTY
@given(bn_then_linear())
def test_bn_before_gemm_or_matmul_folds_into_the_following_operator(case: Case) -> None:
    fold_and_check(case)


@PROPERTY
@given(bn_then_conv(EXACT_PADDING))
def test_bn_before_unpadded_conv_folds_into_the_following_conv(case: Case) -> None:
    fold_and_check(case)


@PROPERTY
@given(bn_then_conv(PADDING))
def test_bn_before_padded_conv_is_left_as_one_mul_add_and_stays_exact(case: Case) -> None:
    folded, report = fold_and_check(case)
    assert "pads" in report.left[0], report.left
    ops = [n.op_type for n in folded.graph.node if n.op_type not in ("Constant", "Identity")]
    assert ops == ["Mul", "Add", "Conv"]
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert node_producing(folded, conv.input[0]).op_type == "Add", "the Conv reads the affine"
    original_conv = next(n for n in case.model.graph.node if n.op_type == "Conv")
    assert list(conv.input[1:]) == list(original_conv.input[1:]), "the Conv's weights untouched"


# --------------------------------------------------------------------------- chains


@st.composite
def mlp_chain(draw: st.DrawFn) -> Case:
    """Linear -> BN -> Relu -> Linear -> BN, each Linear as Gemm, MatMul or MatMul+Add."""
    k, h, n = (draw(st.integers(1, 6)) for _ in range(3))
    first, second = draw(st.sampled_from(LINEARS)), draw(st.sampled_from(LINEARS))
    b = draw(builders())
    z = b.op("Relu", [b.bn(add_linear(b, b.input(["N", k]), first, k, h), h)])
    y = b.bn(add_linear(b, z, second, h, n), n)
    return Case(f"{first}({k}->{h}) -> BN -> Relu -> {second}({h}->{n}) -> BN, {b.label}",
                b.model([y]), b.feeds, Counter([first, second]))


@st.composite
def input_bn_network(draw: st.DrawFn) -> Case:
    """BN on the graph input -> Gemm -> BN -> Relu -> Gemm (an MLP with a BN on its raw input)."""
    k, h, n = (draw(st.integers(1, 6)) for _ in range(3))
    trans_b, c_mode = draw(st.booleans()), draw(st.sampled_from(C_MODES))
    b = draw(builders())
    z = add_gemm(b, b.bn(b.input(["N", k]), k), k, h, trans_b, 1.0, 1.0, c_mode)
    y = add_linear(b, b.op("Relu", [b.bn(z, h)]), "Gemm", h, n)
    return Case(f"BN -> Gemm({k}->{h}, transB={trans_b}, C {c_mode}) -> BN -> Relu -> "
                f"Gemm({h}->{n}), {b.label}", b.model([y]), b.feeds,
                Counter({"following Gemm": 1, "Gemm": 1}))


@st.composite
def two_bns_in_a_row(draw: st.DrawFn) -> Case:
    first = draw(st.sampled_from(("Conv", "Gemm", "MatMul", "graph input")))
    b = draw(builders())
    k, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    if first == "Conv":
        shape = draw(conv_shapes(EXACT_PADDING + PADDING, max_rank=2))
        z = add_conv(b, b.input(["N", shape.c_in, *shape.sizes]), shape, bias=True)
        y = b.bn(b.bn(z, shape.c_out), shape.c_out)
        chain, into, left = f"{shape} -> BN -> BN", Counter({"Conv": 2}), 0
    elif first in ("Gemm", "MatMul"):
        y = b.bn(b.bn(add_linear(b, b.input(["N", k]), first, k, n), n), n)
        chain, left = f"{first}(k={k}, n={n}) -> BN -> BN", 0
        # a MatMul's batch norm becomes a new Add, which the second one then folds into
        into = Counter({"Gemm": 2}) if first == "Gemm" else Counter(["MatMul", "MatMul+Add"])
    else:
        z = b.bn(b.bn(b.input(["N", k]), k), k)
        y = add_gemm(b, z, k, n, trans_b=True, alpha=1.0, beta=1.0, c_mode="[N]")
        chain = f"graph input (k={k}) -> BN -> BN -> Gemm(n={n})"
        # the first has no linear neighbour (onnx_fold's rule 3): one Mul+Add; the second
        # folds into the Gemm
        into, left = Counter({"following Gemm": 1}), 1
    return Case(f"{chain}, {b.label}", b.model([y]), b.feeds, into, left)


@PROPERTY
@given(mlp_chain())
def test_linear_bn_relu_linear_bn_folds_both_batch_norms(case: Case) -> None:
    fold_and_check(case)


@PROPERTY
@given(input_bn_network())
def test_bn_on_the_graph_input_folds_into_the_following_gemm(case: Case) -> None:
    fold_and_check(case)


@PROPERTY
@given(two_bns_in_a_row())
def test_two_batch_norms_in_a_row(case: Case) -> None:
    fold_and_check(case)


# --------------------------------------------------------------------------- shared values


@st.composite
def shared_weight(draw: st.DrawFn) -> Case:
    """One weight read by two nodes; only the first has a batch norm next to it. The second
    computes output "other"."""
    kind = draw(st.sampled_from(("Conv after", "Conv before", "Gemm after", "MatMul before")))
    b = draw(builders())
    if kind.startswith("Conv"):
        shape = draw(conv_shapes(PADDING + EXACT_PADDING if kind == "Conv after"
                                 else EXACT_PADDING))
        x = b.input(["N", shape.c_in, *shape.sizes])
        w = b.weight([shape.c_out, shape.c_in // shape.group, *shape.kernel], shape.c_in)
        bias = b.vector([shape.c_out])
        if kind == "Conv after":
            y = b.bn(b.op("Conv", [x, w, bias], **shape.attrs), shape.c_out)
        else:
            y = b.op("Conv", [b.bn(x, shape.c_in), w, bias], **shape.attrs)
        other = b.op("Conv", [x, w, bias], **shape.attrs)
        what = f"{shape}, BN {kind.split()[1]} one of two readers of its weight"
    else:
        k, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        x = b.input(["N", k])
        w = b.weight([k, n], k)
        if kind == "Gemm after":
            c = b.vector([n])
            y = b.bn(b.op("Gemm", [x, w, c]), n)
            other = b.op("Gemm", [x, w, c])
        else:
            y = b.op("MatMul", [b.bn(x, k), w])
            other = b.op("MatMul", [x, w])
        what = f"{kind.split()[0]}(k={k}, n={n}), BN {kind.split()[1]} one of two readers"
    op, where = kind.split()
    into = op if where == "after" else f"following {op}"
    return Case(f"{what}, {b.label}", b.model([y, other]), b.feeds, Counter({into: 1}))


@PROPERTY
@given(shared_weight())
def test_weight_shared_with_a_node_without_batch_norm_is_not_changed_for_it(case: Case) -> None:
    folded, _ = fold_and_check(case)
    assert_reader_untouched(case.model, folded, case.feeds, case.model.graph.output[1].name)


@st.composite
def conv_read_twice(draw: st.DrawFn) -> Case:
    """Conv -> z; z -> BN -> (output | 1x1 Conv); z -> (Relu | graph output | another BN). The
    batch norm must not fold into the Conv: its other reader would see the scaled value."""
    shape = draw(conv_shapes(EXACT_PADDING + PADDING, max_rank=2))
    other_reader = draw(st.sampled_from(("Relu", "graph output", "another BN")))
    after = draw(st.sampled_from(("graph output", "1x1 Conv")))
    b = draw(builders())
    z = add_conv(b, b.input(["N", shape.c_in, *shape.sizes]), shape, bias=True)
    y = b.bn(z, shape.c_out)
    into: Counter[str] = Counter()
    left = 1
    if after == "1x1 Conv":
        ones = [1] * len(shape.kernel)
        y = b.op("Conv", [y, b.weight([2, shape.c_out, *ones], shape.c_out)], kernel_shape=ones)
        into, left = Counter({"following Conv": 1}), 0
    other = {"Relu": lambda: b.op("Relu", [z]), "graph output": lambda: z,
             "another BN": lambda: b.bn(z, shape.c_out)}[other_reader]()
    left += other_reader == "another BN"
    return Case(f"{shape} -> BN -> {after}, and -> {other_reader}, {b.label}",
                b.model([y, other]), b.feeds, into, left)


@PROPERTY
@given(conv_read_twice())
def test_conv_read_by_bn_and_another_node_keeps_its_weights(case: Case) -> None:
    folded, _ = fold_and_check(case)
    conv = next(n for n in case.model.graph.node if n.op_type == "Conv")
    assert list(node_producing(folded, conv.output[0]).input) == list(conv.input)


NOT_FOLDABLE = (
    "BN -> Gemm(transA=1)",
    "BN on [N, c, L] -> MatMul",
    "MatMul on [N, c, L] -> BN",
    "BN -> ConvTranspose",
    "Gemm -> BN, the Gemm's output also a graph output",
)


@st.composite
def not_foldable(draw: st.DrawFn) -> Case:
    """A batch norm next to a linear operator it must not fold into: the batch norm's channel
    axis is not the operator's feature axis (the shapes are made to fit anyway, so only that
    rule stops a wrong fold), folding through the operator is not exact, or another reader sees
    the operator's output."""
    kind = draw(st.sampled_from(NOT_FOLDABLE))
    k, n = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    b = draw(builders())
    outputs = []
    if kind == "BN -> Gemm(transA=1)":  # A is [k, examples]: axis 1 runs over the examples
        x = b.bn(b.input([k, BATCH]), BATCH)
        outputs.append(add_gemm(b, x, k, n, trans_b=False, alpha=1.0, beta=1.0, c_mode="[N]",
                                transA=1))
    elif kind == "BN on [N, c, L] -> MatMul":  # c == L: W's rows would match the channels
        x = b.bn(b.input(["N", k, k]), k)
        outputs.append(b.op("MatMul", [x, b.weight([k, n], k)]))
    elif kind == "MatMul on [N, c, L] -> BN":  # c == n: W's columns would match the channels
        outputs.append(b.bn(b.op("MatMul", [b.input(["N", n, k]), b.weight([k, n], k)]), n))
    elif kind == "BN -> ConvTranspose":  # the shift would reach each output a varying number
        x = b.bn(b.input(["N", k, 4]), k)  # of times (fewer near the borders)
        outputs.append(b.op("ConvTranspose", [x, b.weight([k, n, 3], 3 * k)], kernel_shape=[3],
                            strides=[draw(st.integers(1, 2))]))
    else:
        z = add_gemm(b, b.input(["N", k]), k, n, trans_b=True, alpha=1.0, beta=1.0,
                     c_mode="[N]")
        outputs += [b.bn(z, n), z]
    return Case(f"{kind} (k={k}, n={n}), {b.label}", b.model(outputs), b.feeds, left=1)


@PROPERTY
@given(not_foldable())
def test_bn_next_to_an_operator_it_must_not_fold_into_is_left_and_exact(case: Case) -> None:
    fold_and_check(case)


# --------------------------------------------------------------------------- negative controls
# The checks above must be able to fail: each wrong fold below, built by hand, is caught by the
# same assert_same_outputs (and assert_reader_untouched), while the right fold of the same graph
# passes them.


BnStats = tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]


def _bn_stats(rng: np.random.Generator, c: int) -> BnStats:
    return (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c), rng.normal(size=c),
            rng.normal(size=c), rng.uniform(1e-3, 1e-2, c))


def _single_op_model(op: str, x_shape: list[int | str], w: NDArray[Any], b: NDArray[Any] | None,
                     bn: tuple[NDArray[np.float64], ...] | None, eps: float, bn_first: bool,
                     **attrs: Any) -> onnx.ModelProto:
    """x -> [BN] -> op(W, b) -> [BN] -> y, with the BN where asked (or none)."""
    inits = {"W": w, **({"B": b} if b is not None else {})}
    nodes = []
    x = "x"
    if bn is not None:
        inits.update(zip(("gamma", "beta", "mean", "var"), bn, strict=True))
        node = helper.make_node(BN, ["x" if bn_first else "z", "gamma", "beta", "mean", "var"],
                                ["xn" if bn_first else "y"], epsilon=eps)
        x = "xn" if bn_first else "x"
    out = "z" if bn is not None and not bn_first else "y"
    nodes.append(helper.make_node(op, [x, "W", *(["B"] if b is not None else [])], [out],
                                  **attrs))
    if bn is not None:
        nodes.insert(0 if bn_first else 1, node)
    return typed_model(helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()],
    ))


def test_negative_control_bn_folded_into_a_padded_conv_differs_at_the_borders() -> None:
    rng = np.random.default_rng(1)
    c, m, length, eps = 3, 4, 9, 1e-3
    w, bias = rng.normal(size=(m, c, 3)) / 3.0, rng.normal(size=m)
    stats = _bn_stats(rng, c)
    x = {"x": rng.normal(size=(BATCH, c, length)).astype(np.float32)}
    attrs = {"kernel_shape": [3], "pads": [1, 1]}
    original = _single_op_model("Conv", ["N", c, length], w, bias, stats, eps, True, **attrs)
    s, t = folding.affine(*stats, eps)
    w2, b2 = folding.before_conv(w, bias, s, t, 1)
    wrong = _single_op_model("Conv", ["N", c, length], w2, b2, None, eps, True, **attrs)

    with pytest.raises(AssertionError, match="folded vs original"):
        assert_same_outputs(original, wrong, x)
    (ref,), (got,) = ort_run(original, x), ort_run(wrong, x)
    interior, border = slice(1, length - 1), [0, length - 1]
    # the equations hold where the kernel sees no padding; the padding zeros were not shifted
    assert scaled_error(got[..., interior], ref[..., interior]) <= RTOL
    assert scaled_error(got[..., border], ref[..., border]) > 100 * RTOL
    folded = copy.deepcopy(original)
    assert fold_batchnorms(folded).into["following Conv"] == 0


def _wrong_conv_transpose(w: NDArray[Any], b: NDArray[Any], s: NDArray[Any], t: NDArray[Any],
                          stats: BnStats, eps: float
                          ) -> tuple[NDArray[Any], NDArray[Any]]:
    return folding.after_conv(w, b, s, t)  # scales axis 0, the *input* channels of ConvTranspose


WrongFold = Callable[[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any], BnStats, float],
                     tuple[NDArray[Any], NDArray[Any]]]
WRONG_FOLDS: dict[str, WrongFold] = {
    "shift forgotten": lambda w, b, s, t, stats, eps: folding.after_conv(w, b, s, 0 * t),
    "eps ignored": lambda w, b, s, t, stats, eps: folding.after_conv(
        w, b, *folding.affine(*stats, 0.0)),
    "ConvTranspose scaled on W's axis 0": _wrong_conv_transpose,
}


@pytest.mark.parametrize("mistake", list(WRONG_FOLDS))
def test_negative_control_wrong_fold_equations_are_caught(mistake: str) -> None:
    rng = np.random.default_rng(2)
    c, length, eps = 4, 6, 1e-3
    op = "ConvTranspose" if mistake.startswith("ConvTranspose") else "Conv"
    w, bias = rng.normal(size=(c, c, 3)) / 3.0, rng.normal(size=c)  # square: both layouts fit
    stats = _bn_stats(rng, c)
    x = {"x": rng.normal(size=(BATCH, c, length)).astype(np.float32)}
    attrs: dict[str, Any] = {"kernel_shape": [3], "pads": [1, 0]}
    original = _single_op_model(op, ["N", c, length], w, bias, stats, eps, False, **attrs)
    s, t = folding.affine(*stats, eps)
    right = (folding.after_conv_transpose(w, bias, s, t, 1) if op == "ConvTranspose"
             else folding.after_conv(w, bias, s, t))
    wrong = WRONG_FOLDS[mistake](w, bias, s, t, stats, eps)

    def model(wb: tuple[NDArray[Any], NDArray[Any]]) -> onnx.ModelProto:
        return _single_op_model(op, ["N", c, length], *wb, None, eps, False, **attrs)

    assert_same_outputs(original, model(right), x)
    with pytest.raises(AssertionError, match="folded vs original"):
        assert_same_outputs(original, model(wrong), x)


def test_negative_control_scaling_a_shared_weight_in_place_is_caught() -> None:
    b = Builder(3)
    x = b.input(["N", 3])
    y = b.bn(b.op("MatMul", [x, b.weight([3, 4], 3)]), 4)
    matmul, bn = b.nodes
    other = b.op("MatMul", [x, matmul.input[1]])
    original = b.model([y, other])
    # the wrong fold: scale the shared initializer itself, and drop the batch norm
    wrong = copy.deepcopy(original)
    inits = {t.name: t for t in wrong.graph.initializer}
    gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64)
                              for n in bn.input[1:])
    eps = next((helper.get_attribute_value(a) for a in bn.attribute if a.name == "epsilon"), 1e-5)
    s, t = folding.affine(gamma, beta, mean, var, eps)
    w2, b2 = folding.after_matmul(numpy_helper.to_array(inits[matmul.input[1]]), None, s, t)
    inits[matmul.input[1]].CopyFrom(numpy_helper.from_array(w2.astype(np.float32),
                                                            matmul.input[1]))
    wrong.graph.initializer.append(numpy_helper.from_array(b2.astype(np.float32), "shift"))
    del wrong.graph.node[1]
    wrong.graph.node.insert(1, helper.make_node("Add", [matmul.output[0], "shift"], [y]))

    (ref, _), (got, _) = ort_run(original, b.feeds), ort_run(wrong, b.feeds)
    assert scaled_error(got, ref) <= RTOL  # the folded branch itself is right...
    with pytest.raises(AssertionError):  # ...but the other reader now sees the scaled weight
        assert_reader_untouched(original, wrong, b.feeds, other)
    with pytest.raises(AssertionError, match=f"^{other}: folded vs original"):
        assert_same_outputs(original, wrong, b.feeds)


def test_a_batch_norm_left_over_keeps_its_inputs_dtype() -> None:
    """BatchNormalization-15 allows float32 statistics on a float16 input: the Mul+Add that
    replaces it must be in the input's dtype, or the graph no longer type-checks."""
    stats = {n: numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in
             {"g": [1.0, -2.0, 3.0], "b": [0.0, 1.0, 0.5], "m": [0.0, 0.2, 1.0],
              "v": [1.0, 0.5, 2.0]}.items()}
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], name="bn")],
        "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 3])],
        list(stats.values()))
    model = typed_model(graph)
    onnx.checker.check_model(model, full_check=True)
    folded = copy.deepcopy(model)
    report = fold_batchnorms(folded)
    assert len(report.left) == 1
    onnx.checker.check_model(folded, full_check=True)
    x = np.array([[0.5, -1.0, 2.0], [3.0, 0.0, -0.25]], np.float16)
    np.testing.assert_allclose(ort_run(folded, {"x": x})[0].astype(np.float32),
                               ort_run(model, {"x": x})[0].astype(np.float32), atol=1e-2)
