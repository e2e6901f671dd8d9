"""``bnserve-export --from-onnx``: an ONNX model with batch norm -> a folded, verified model.

Steps, each refusing (``RefusedError``, exit status 2, nothing written) what it cannot handle:

1. load: a file that is not ONNX, an opset below 9, more than one input, a non-float32 input,
   a symbolic dimension after the batch, or an ambiguous output is refused with the reason;
2. interface: the input is renamed ``features`` and its batch dimension made dynamic (a Reshape
   whose constant shape starts with the file's fixed batch size copies the batch instead);
3. fold (``model_export/onnx_fold.py``), then verify against the original file
   (``model_export/onnx_verify.py``);
4. head: what the output means (``--output-kind``): ``logits`` gets Softmax and ArgMax
   (outputs ``probabilities``, ``label``), ``probabilities`` gets ArgMax, ``values`` is renamed
   ``values`` and served as it is;
5. metadata (the interface ``app/predictor.py`` checks, and the first samples verified on as
   ``example_inputs`` for the service's OpenAPI examples), then the whole file is verified again.

Drift monitoring (unless ``Options.drift`` is off, ``--no-drift-outputs``): each batch norm's
statistics are recorded before folding, and after folding every batch-norm output that a tensor
still carries becomes an extra graph output ``drift.bn<i>`` (i counts the batch norms in graph
order), described in metadata ``drift_reference`` (``model_export/drift_reference.py``; no input
group: an imported model's input statistics are unknown). A batch norm folded into the operator
that follows it has no output any more: the log and the fold report say "not monitored". The
final check compares each drift output with the original file's batch-norm output.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from numpy.typing import NDArray
from onnx import TensorProto, helper

from model_export import drift_reference, onnx_verify
from model_export import graph as bnserve_graph
from model_export.onnx_fold import FoldReport, RefusedError, fold_batchnorms, label
from model_export.onnx_graph import Graph, attr

OutputKind = Literal["logits", "probabilities", "values"]
OUTPUT_KINDS: tuple[OutputKind, ...] = ("logits", "probabilities", "values")
VALUES = "values"
MIN_OPSET = 9
BATCH = "N"


@dataclass(frozen=True)
class Options:
    output_kind: OutputKind = "logits"
    class_names: list[str] | None = None
    feature_names: list[str] | None = None
    output: str | None = None  # which graph output to serve; default: the only one
    samples: NDArray[np.float32] | None = None
    model_version: str | None = None
    drift: bool = True  # drift.* outputs and drift_reference
    extra_metadata: dict[str, Any] | None = None  # added keys, e.g. recalibrated_from


@dataclass(frozen=True)
class Imported:
    model_bytes: bytes
    report: FoldReport
    lines: list[str]  # what was checked, as printed
    fold_seconds: float

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()


def load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise RefusedError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise RefusedError(f"{path} is not an ONNX model: {e}") from None
    if not model.graph.node or not model.graph.output:
        raise RefusedError(f"{path} is not an ONNX model: it has no graph (nodes and outputs)")
    return model


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


@dataclass(frozen=True)
class Interface:
    """What the original file takes and gives, and where the served graph differs."""

    input_name: str
    input_shape: tuple[int, ...]  # per example, after the batch dimension
    fixed_batch: int | None  # the file's own batch size, if it fixed one
    output_name: str


def interface(model: onnx.ModelProto, output: str | None) -> Interface:
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    if len(inputs) != 1:
        raise RefusedError(f"the model has {len(inputs)} inputs {[v.name for v in inputs]}; "
                           "bnserve serves models with exactly one input tensor")
    inp = inputs[0]
    t = inp.type.tensor_type
    if t.elem_type != TensorProto.FLOAT:
        kind = TensorProto.DataType.Name(t.elem_type) if t.elem_type else "not a tensor"
        raise RefusedError(f"input {inp.name!r} is {kind}; bnserve serves float32 inputs "
                           "(export the model in float32)")
    dims = list(t.shape.dim)
    if len(dims) < 2:
        raise RefusedError(f"input {inp.name!r} has rank {len(dims)}; bnserve needs a batch "
                           "dimension followed by at least one feature dimension, e.g. [N, 13]")
    shape: list[int] = []
    for k, d in enumerate(dims[1:], start=1):
        if not d.HasField("dim_value") or d.dim_value <= 0:
            raise RefusedError(f"dimension {k} of input {inp.name!r} is {d.dim_param or '?'!r}: "
                               "bnserve serves a fixed shape per example; export with only the "
                               "batch dimension dynamic")
        shape.append(d.dim_value)
    outputs = [o.name for o in model.graph.output]
    if output is None and len(outputs) != 1:
        raise RefusedError(f"the model has {len(outputs)} outputs {outputs}: choose the one to "
                           "serve with --output NAME")
    if output is not None and output not in outputs:
        raise RefusedError(f"--output {output!r} is not an output of the model: {outputs}")
    fixed = dims[0].dim_value if dims[0].HasField("dim_value") else None
    return Interface(inp.name, tuple(shape), fixed, output or outputs[0])


def prepare(model: onnx.ModelProto, iface: Interface) -> tuple[onnx.ModelProto, list[str]]:
    """A copy with one output, the input named ``features`` and a dynamic batch dimension."""
    m = copy.deepcopy(model)
    notes: list[str] = []
    g = m.graph
    inits = {t.name for t in g.initializer}
    if m.ir_version < 4:  # IR 3 lists every weight as an input; from IR 4 on weights are constants
        kept = [v for v in g.input if v.name not in inits]
        del g.input[:]
        g.input.extend(kept)
        m.ir_version = 4
    chosen = [o for o in g.output if o.name == iface.output_name]
    del g.output[:]
    g.output.extend(chosen)
    for vi in (g.input[0], g.output[0]):
        if vi.type.tensor_type.HasField("shape") and vi.type.tensor_type.shape.dim:
            d0 = vi.type.tensor_type.shape.dim[0]
            d0.Clear()
            d0.dim_param = BATCH
    del g.value_info[:]
    graph = Graph(m)
    if iface.fixed_batch is not None:
        n = _copy_batch_in_reshapes(graph, iface.fixed_batch)
        if n:
            notes.append(f"{n} Reshape(s) with the fixed batch size {iface.fixed_batch} now copy "
                         "the batch dimension (shape 0 -> the input's)")
    if iface.input_name != bnserve_graph.INPUT:
        graph.rename_value(iface.input_name, bnserve_graph.INPUT)
    graph.prune()
    return m, notes


def _copy_batch_in_reshapes(graph: Graph, batch: int) -> int:
    count = 0
    for node in graph.g.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        shape = graph.constant(node.input[1])
        if shape is None or shape.ndim != 1 or not len(shape) or int(shape[0]) != batch:
            continue
        if attr(node, "allowzero", 0):
            continue
        new = shape.copy()
        new[0] = 0  # Reshape's 0: copy this dimension from the input
        node.input[1] = graph.set_constant(node.input[1], new)
        count += 1
    return count


def add_head(model: onnx.ModelProto, kind: OutputKind, example_out: tuple[int, ...]) -> int:
    """Name the served outputs; returns the number of classes (0 for values)."""
    g = model.graph
    graph = Graph(model)
    out = g.output[0].name
    if out == bnserve_graph.INPUT or graph.producer(out) is None:
        raise RefusedError(f"output {out!r} is not computed by any node")
    if kind == "values":
        graph.rename_value(out, VALUES)
        _set_output(g, [(VALUES, TensorProto.FLOAT, [BATCH, *example_out])])
        return 0
    k = example_out[0] if example_out else 0
    if len(example_out) < 1 or any(d != 1 for d in example_out[1:]) or k < 2:
        shape = ", ".join(map(str, example_out))
        raise RefusedError(f"--output-kind {kind} needs an output of shape [N, classes] with at "
                           f"least 2 classes; output {out!r} is [N, {shape}]; use "
                           "--output-kind values to serve it as it is")
    last = g.node[-1]
    scores = out
    if len(example_out) > 1:  # [N, K, 1, 1] (a 1x1 conv head): flatten to [N, K]
        scores = graph.fresh(out + ".flat")
        last = graph.add_node("Flatten", [out], [scores], after=last, axis=1)
    if kind == "logits":
        last = graph.add_node("Softmax", [scores], [bnserve_graph.OUTPUT_PROBS], after=last,
                              axis=1)
    else:
        graph.rename_value(scores, bnserve_graph.OUTPUT_PROBS)
        scores = bnserve_graph.OUTPUT_PROBS
    graph.add_node("ArgMax", [scores], [bnserve_graph.OUTPUT_LABEL], after=last, axis=1,
                   keepdims=0)
    _set_output(g, [(bnserve_graph.OUTPUT_PROBS, TensorProto.FLOAT, [BATCH, k]),
                    (bnserve_graph.OUTPUT_LABEL, TensorProto.INT64, [BATCH])])
    return k


def _set_output(g: onnx.GraphProto, outputs: list[tuple[str, Any, list[Any]]]) -> None:
    """The served outputs, then the drift outputs as they were."""
    drift = [o for o in g.output if o.name.startswith(drift_reference.PREFIX)]
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(n, t, s) for n, t, s in outputs)
    g.output.extend(drift)


def _names(given: list[str] | None, n: int, prefix: str, what: str) -> list[str]:
    if given is None:
        return [f"{prefix}{i}" for i in range(n)]
    if len(given) != n or len(set(given)) != n or not all(given):
        raise RefusedError(f"{what}: {len(given)} names given ({', '.join(given[:5])}...) but "
                           f"the model has {n}; give {n} distinct non-empty names")
    return given


def _version(model: onnx.ModelProto) -> str:
    return "sha-" + hashlib.sha256(model.graph.SerializeToString()).hexdigest()[:12]


def import_model(
    path: Path, opts: Options, log: Callable[[str], None] = print
) -> Imported:
    """Load, fold, verify and label ``path``; RefusedError (or VerificationError) if anything
    fails, with nothing written."""
    original = load(path)
    opset = _opset(original)
    if opset < MIN_OPSET:
        raise RefusedError(f"the model uses opset {opset}; bnserve imports opset {MIN_OPSET} or "
                           "later (onnx.version_converter.convert_version can upgrade it)")
    iface = interface(original, opts.output)
    samples = onnx_verify.samples(opts.samples, iface.input_shape)
    prepared, notes = prepare(original, iface)
    t0 = time.perf_counter()
    report = fold_batchnorms(prepared)
    seconds = time.perf_counter() - t0
    exposed = (drift_reference.expose_batchnorms(prepared, report.outcomes) if opts.drift
               else drift_reference.Exposed([], {}, {}, []))
    lines = [*notes, report.summary(), *report.left, *exposed.not_monitored]
    for line in lines:
        log(line)
    tensors = onnx_verify.run_original_tensors(
        original, iface, samples, [iface.output_name, *exposed.originals.values()])
    reference = tensors[iface.output_name]
    drift_expected = {d: tensors[o] for d, o in exposed.originals.items()}
    lines += onnx_verify.check_folded(prepared, reference, samples, log)

    kind = opts.output_kind
    example_out = reference.shape[1:]
    k = add_head(prepared, kind, tuple(int(d) for d in example_out))
    props: dict[str, Any] = {
        **(opts.extra_metadata or {}),
        "format": bnserve_graph.FORMAT,
        "output_kind": "values" if kind == "values" else "classifier",
        "fold_report": {**report.as_dict(), "notes": notes,  # no timings: same input, same bytes
                        **({"drift": {"monitored": exposed.monitored,
                                      "not_monitored": exposed.not_monitored}}
                           if opts.drift else {})},
        "source": f"onnx:{path.name} sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}",
        "source_producer": f"{original.producer_name} {original.producer_version}".strip(),
        "opset": opset,
        "folded": "true",
    }
    examples = bnserve_graph.example_inputs(samples)  # inputs every check runs on
    if examples is not None:
        given = "--samples" if opts.samples is not None else (
            f"the {len(samples)} standard-normal inputs export generated (no --samples)")
        props[bnserve_graph.EXAMPLES] = examples
        props[bnserve_graph.EXAMPLE_SOURCE] = f"the first {len(examples)} of {given}"
    if k:
        props["class_names"] = _names(opts.class_names, k, "class_", "--classes")
    if len(iface.input_shape) == 1:
        props["feature_names"] = _names(opts.feature_names, iface.input_shape[0], "x",
                                        "--features")
    elif opts.feature_names is not None:
        raise RefusedError("--features names the values of a 1-D input; this model's input is "
                           f"{list(iface.input_shape)} per example")
    if exposed.groups:
        props[drift_reference.KEY] = drift_reference.reference(exposed.groups)
    props["model_version"] = opts.model_version or _version(prepared)
    del prepared.metadata_props[:]
    helper.set_model_props(prepared, {key: v if isinstance(v, str) else json.dumps(v)
                                      for key, v in sorted(props.items())})
    prepared.producer_name, prepared.producer_version = "bnserve", ""
    lines += onnx_verify.check_final(prepared, reference, kind, samples, log, drift_expected)
    return Imported(prepared.SerializeToString(), report, lines, seconds)


__all__ = ["OUTPUT_KINDS", "Imported", "Options", "RefusedError", "import_model", "label"]
