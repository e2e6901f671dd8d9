"""The checks an imported model passes before a byte of it is written.

The reference is the user's original file, untouched, run by ONNX Runtime with every graph
optimisation off (so ORT's own Conv+BN fusion does not stand in for the thing being checked),
at the batch size the file allows. Against it:

1. the folded graph (as the service runs it, optimisations on) on every sample;
2. the final file: ``onnx.checker`` (full), its outputs (softmax of the reference for ``logits``,
   the reference itself for ``probabilities`` and ``values``; labels equal wherever the
   reference's top two classes are further apart than the tolerance), the same file run by
   ``onnx.reference`` on the first samples, and each sample alone equal to the same sample
   inside the batch, bit for bit (every output, the drift outputs included);
3. each drift output ``drift.bn<i>`` of the final file against the original file's output of
   that batch norm (the original run again with that tensor as an extra output).

Tolerance, absolute: ``1e-4 * max(1, max |reference output|)`` (for a drift output, its own
reference tensor's maximum). Folding reorders float32
arithmetic (the scale is multiplied into the weights before the sums instead of after), so a
deep network accumulates differences of a few float32 ulps per layer, about 1e-6 relative; a
wrong fold moves outputs by the size of a batch-norm shift, orders of magnitude more.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import helper
from onnx.reference import ReferenceEvaluator

from model_export import graph as bnserve_graph
from model_export.onnx_fold import TRAINING_FIX, RefusedError

if TYPE_CHECKING:
    from model_export.onnx_import import Interface

RTOL = 1e-4
N_GENERATED = 8
N_REFERENCE_EVALUATOR = 2  # onnx.reference is plain numpy: a few samples keep it quick
F32 = NDArray[np.float32]


class VerificationError(RuntimeError):
    """The folded model does not compute what the original computes; nothing was written."""


def samples(given: NDArray[Any] | None, shape: tuple[int, ...]) -> F32:
    """``--samples`` as float32 [n, *shape], or N_GENERATED standard-normal ones (seed 0)."""
    if given is None:
        return np.random.default_rng(0).normal(size=(N_GENERATED, *shape)).astype(np.float32)
    x = np.asarray(given, dtype=np.float32)
    if x.shape == shape:
        x = x[None]
    if x.shape[1:] != shape or len(x) == 0:
        raise RefusedError(f"--samples holds an array of shape {list(x.shape)}; expected "
                           f"[n, {', '.join(map(str, shape))}] for this model's input")
    if not np.isfinite(x).all():
        raise RefusedError("--samples holds NaN or infinite values")
    if len(x) < 2:
        raise RefusedError("--samples needs at least 2 examples: one alone must be compared with "
                           "the same one inside a batch")
    return x


def session(model: onnx.ModelProto, optimize: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_original_tensors(model: onnx.ModelProto, iface: Interface, x: F32,
                         names: list[str]) -> dict[str, NDArray[np.float64]]:
    """Any tensors of the original file (intermediate ones made extra graph outputs of a copy)
    for every sample, in float64, in one run."""
    unique = list(dict.fromkeys(names))
    m = copy.deepcopy(model)
    present = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in unique
                          if n not in present)
    return dict(zip(unique, _run_original(m, iface, x, unique), strict=True))


def _run_original(model: onnx.ModelProto, iface: Interface, x: F32,
                  names: list[str]) -> list[NDArray[np.float64]]:
    try:
        sess = session(model, optimize=False)
        step = iface.fixed_batch or len(x)
        chunks: list[list[NDArray[Any]]] = []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            padded = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]),
                                                     np.float32)])
            outs = sess.run(names, {iface.input_name: padded})
            chunks.append([np.asarray(o)[: len(chunk)] for o in outs])
    except Exception as e:  # ORT's own exception types
        raise RefusedError(
            f"ONNX Runtime cannot run the original model: {_first_line(e)}") from None
    return [np.concatenate([c[k] for c in chunks]).astype(np.float64) for k in range(len(names))]


def tolerance(reference: NDArray[np.float64]) -> float:
    return RTOL * max(1.0, float(np.abs(reference).max()))


def _check(ok: bool, line: str, log: Callable[[str], None]) -> str:
    line = f"verify: {line} ... {'ok' if ok else 'FAILED'}"
    log(line)
    if not ok:
        raise VerificationError(line)
    return line


def _run_batch(sess: ort.InferenceSession, x: F32, what: str) -> list[NDArray[Any]]:
    try:
        return [np.asarray(o) for o in sess.run(None, {bnserve_graph.INPUT: x})]
    except Exception as e:
        raise RefusedError(
            f"the {what} graph does not run on a batch of {len(x)} examples: {_first_line(e)}. "
            "The file probably fixes the batch size inside the graph (a Reshape, Expand or "
            "Tile with a constant batch); export it with a dynamic batch dimension, e.g. "
            "torch.onnx.export(..., dynamic_axes={'input': {0: 'N'}, 'output': {0: 'N'}})"
        ) from None


def _check_batch_independence(sess: ort.InferenceSession, x: F32, out: NDArray[Any],
                              tol: float) -> None:
    """First of all: an example's answer must not depend on the rest of its batch. A graph that
    normalises with the batch's own statistics (a training-mode export, whatever operators it
    was written with) fails here, with the fix, before any comparison could blame the folding."""
    alone = np.concatenate([_run_batch(sess, x[i : i + 1], "folded")[0] for i in range(len(x))])
    moved = float(np.abs(alone.astype(np.float64) - out).max())
    if moved > tol:
        raise RefusedError(
            f"each example's answer depends on the other examples in its batch (alone vs inside "
            f"a batch of {len(x)}: max |d| {moved:.2e}, tol {tol:.1e}): the graph normalises "
            f"with the statistics of the batch it is given. {TRAINING_FIX}; a Keras model must "
            "not be converted from a function that calls it with training=True")


def check_folded(
    folded: onnx.ModelProto, reference: NDArray[np.float64], x: F32, log: Callable[[str], None]
) -> list[str]:
    try:
        sess = session(folded, optimize=True)
    except Exception as e:  # a rewrite ONNX Runtime cannot load is a folding bug: never written
        raise VerificationError(
            f"ONNX Runtime cannot load the folded graph: {_first_line(e)}") from None
    out = _run_batch(sess, x, "folded")[0]  # the served output; drift outputs: check_final
    tol = tolerance(reference)
    _check_batch_independence(sess, x, out, tol)
    ok_shape = out.shape == reference.shape
    diff = float(np.abs(out - reference).max()) if ok_shape else float("inf")
    return [_check(
        ok_shape and diff <= tol,
        f"folded graph vs the original file in ONNX Runtime (graph optimisations off) on "
        f"{len(x)} samples: max |d| {diff:.2e} (tol {tol:.1e} = {RTOL:g} x max(1, max |output| "
        f"{float(np.abs(reference).max()):.3g}))",
        log,
    )]


def _softmax(z: NDArray[np.float64]) -> NDArray[np.float64]:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p: NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return p


def _reference_gap(model: onnx.ModelProto) -> str | None:
    """Why onnx.reference cannot be trusted on this graph, if it cannot."""
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "ConvTranspose" and group > 1:
            return (f"onnx.reference {onnx.__version__} computes a grouped ConvTranspose wrongly "
                    "(it splits the weight by output instead of input channels)")
    return None


def _check_reference_evaluator(
    final: onnx.ModelProto, x: F32, outs: list[NDArray[Any]], tol: float,
    log: Callable[[str], None],
) -> str:
    """The final file run by onnx.reference agrees with ONNX Runtime, where onnx.reference can
    run it; where it cannot, the line says so (and the other checks stand)."""
    n_ref = min(N_REFERENCE_EVALUATOR, len(x))
    gap = _reference_gap(final)
    if gap is None:
        try:
            ref_outs = ReferenceEvaluator(final).run(None, {bnserve_graph.INPUT: x[:n_ref]})
        except Exception as e:  # its own gaps: an operator or attribute it does not implement
            gap = f"onnx.reference failed: {type(e).__name__}: {_first_line(e)}"
    if gap is not None:
        line = f"verify: onnx.reference vs ONNX Runtime on the final file ... not run: {gap}"
        log(line)
        return line
    # Each output within its own scale: drift outputs are not bounded like probabilities.
    ratio, diff, tol = max(
        (d / t, d, t)
        for r, o in zip(ref_outs, outs, strict=True)
        for d, t in [(float(np.abs(np.asarray(r, dtype=np.float64) - o[:n_ref]).max()),
                      max(tol, tolerance(o[:n_ref].astype(np.float64))))]
    )
    return _check(ratio <= 1, f"onnx.reference vs ONNX Runtime on the final file, {n_ref} "
                  f"samples, {len(outs)} outputs: worst max |d| {diff:.2e} (tol {tol:.1e})", log)


def _check_drift(names: list[str], outs: list[NDArray[Any]],
                 expected: dict[str, NDArray[np.float64]], x: F32,
                 log: Callable[[str], None]) -> str:
    """Each drift output against the original's batch-norm output; one line, the worst one."""
    by_name = dict(zip(names, outs, strict=True))
    rows = []
    for name, ref in expected.items():
        got = by_name.get(name)
        ok = got is not None and got.shape == ref.shape
        diff = float(np.abs(got - ref).max()) if ok and got is not None else float("inf")
        rows.append((diff / tolerance(ref), name, diff, tolerance(ref)))
    ratio, name, diff, tol = max(rows)
    n = f"{len(expected)} drift output{'s' if len(expected) != 1 else ''}"
    return _check(ratio <= 1, f"{n} vs the original's batch-norm outputs on {len(x)} samples: "
                  f"worst {name} max |d| {diff:.2e} (tol {tol:.1e} = {RTOL:g} x max(1, max "
                  "|tensor|))", log)


def check_final(
    final: onnx.ModelProto, reference: NDArray[np.float64], kind: str, x: F32,
    log: Callable[[str], None], drift: dict[str, NDArray[np.float64]] | None = None,
) -> list[str]:
    """``drift``: each drift output's expected values (the original's batch-norm output)."""
    lines = []
    try:
        onnx.checker.check_model(final, full_check=True)
    except onnx.checker.ValidationError as e:
        raise VerificationError(
            f"onnx.checker rejects the folded model: {_first_line(e)}") from None
    opset = max(o.version for o in final.opset_import if o.domain in ("", "ai.onnx"))
    lines.append(_check(True, f"onnx.checker full_check (opset {opset}, IR {final.ir_version})",
                        log))
    sess = session(final, optimize=True)
    outs = _run_batch(sess, x, "final")
    tol = tolerance(reference)
    if kind == "values":
        expected = [reference]
        what = "values"
    else:
        flat = reference.reshape(len(reference), -1)
        probs = _softmax(flat) if kind == "logits" else flat
        expected = [probs]
        what = "probabilities" + (" (softmax of the reference)" if kind == "logits" else "")
    diff = float(np.abs(outs[0] - expected[0]).max())
    lines.append(_check(diff <= tol, f"final {what} vs the original on {len(x)} samples: max "
                        f"|d| {diff:.2e} (tol {tol:.1e})", log))
    if kind != "values":
        top2 = np.sort(expected[0], axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
        same = outs[1] == expected[0].argmax(axis=1)
        lines.append(_check(bool(same[clear].all()),
                            f"labels equal the original's argmax: {int(same[clear].sum())}/"
                            f"{int(clear.sum())} (ties within the tolerance excluded)", log))
    if drift:
        lines.append(_check_drift([o.name for o in sess.get_outputs()], outs, drift, x, log))
    lines.append(_check_reference_evaluator(final, x, outs, tol, log))
    alone = [_run_batch(sess, x[i : i + 1], "final") for i in range(len(x))]
    n_diff = sum(
        int(not all(np.array_equal(a[0], o[i]) for a, o in zip(one, outs, strict=True)))
        for i, one in enumerate(alone)
    )
    lines.append(_check(n_diff == 0, f"each of {len(x)} samples alone vs inside the batch: "
                        f"{n_diff} differ (bitwise)", log))
    return lines
