"""Checkpoint -> verified ONNX file, and the ``bnserve-export`` command.

Nothing is written unless every check passes:
  1. ``onnx.checker`` with ``full_check`` (shape inference included);
  2. ONNX Runtime's probabilities equal the numpy inference-mode forward within ``TOL`` on the
     validation set stored in the checkpoint, and the predicted labels are the same;
  3. each drift output ``drift.bn<l>`` equals the numpy forward's batch-norm output z~ of layer
     l within ``TOL`` x max(1, max |z~|) (z~ is not bounded like a probability);
  4. the folded graph and the keep-batchnorm graph agree within the same tolerances;
  5. every validation row predicted alone gives bit-for-bit the outputs (all of them, drift
     outputs included) it gets inside the batch.

By default the model carries its own drift reference (metadata ``drift_reference``: the input
standardisation and each batch norm's statistics) and exposes each batch norm's output as an
extra graph output ``drift.bn<l>``, which the service watches and never returns
(``model_export/drift_reference.py``); ``--no-drift-outputs`` writes the bare interface.

The metadata holds the first validation rows too (``example_inputs``, exactly the values checked):
the service's OpenAPI document makes its request examples from them (app/docs.py).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray

from model_export import (
    checkpoint,
    drift_reference,
    graph,
    mlp,
    onnx_import,
    onnx_verify,
    outputs,
)
from model_export.batchnorm import Array
from model_export.mlp import Network
from model_export.train import DEFAULT_CHECKPOINT

DEFAULT_MODEL = Path("models/default.onnx")
TOL = 1e-5  # float32 graph vs float64 numpy reference, absolute, on probabilities


class VerificationError(RuntimeError):
    """The exported graph does not compute what the network computes; nothing was written."""


@dataclass(frozen=True)
class Exported:
    model_bytes: bytes
    report: list[str]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()


def metadata(net: Network, meta: dict[str, Any], model_version: str) -> dict[str, Any]:
    figures = meta.get("figures", {})
    return {
        "model_version": model_version,
        "feature_names": meta["feature_names"],
        "class_names": meta["class_names"],
        "hidden": meta["hidden"],
        "eps": net.eps,
        "estimator": net.estimator,
        "beta_avg": net.beta_avg,
        "averaging": meta.get("averaging", ""),
        "train_accuracy": figures.get("train_accuracy"),
        "val_accuracy": figures.get("val_accuracy"),
        "n_train": figures.get("n_train"),
        "n_val": figures.get("n_val"),
        "data_sha256": meta["data_sha256"],
        "data_source": meta.get("data_source", ""),
        "opset": graph.OPSET,
    }


def session(model_bytes: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # deterministic and cheap: one thread is plenty here
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def run_all(sess: ort.InferenceSession, x: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
    """Every graph output by name, the drift outputs included."""
    names = [o.name for o in sess.get_outputs()]
    return {n: np.asarray(v) for n, v in zip(names, sess.run(names, {graph.INPUT: x}), strict=True)}


def bn_tolerance(expected: Array) -> float:
    """A drift output's tolerance: ``TOL`` relative to its size (at least ``TOL``)."""
    return TOL * max(1.0, float(np.abs(expected).max()))


def _worst(got: dict[str, NDArray[Any]], expected: dict[str, Array]) -> tuple[str, float, float]:
    """(name, max |d|, tolerance) of the drift output furthest from ``expected``, relative to
    its tolerance; missing or misshapen outputs count as infinitely far."""
    rows = []
    for name, ref in expected.items():
        out = got.get(name)
        ok = out is not None and out.shape == ref.shape
        diff = float(np.abs(out - ref).max()) if ok and out is not None else float("inf")
        rows.append((name, diff, bn_tolerance(ref)))
    return max(rows, key=lambda r: r[1] / r[2])


def _check_drift(
    got: dict[str, NDArray[Any]], expected: dict[str, Array], what: str, report: list[str],
    log: Callable[[str], None],
) -> None:
    if not expected:
        return
    name, diff, tol = _worst(got, expected)
    n = f"{len(expected)} drift output{'s' if len(expected) != 1 else ''}"
    _check(diff <= tol, f"{what}: {n}, worst {name} max |dz| {diff:.2e} "
           f"(tol {tol:.1e} = {TOL:.0e} x max(1, max |z~|))", report, log)


def _check(ok: bool, line: str, report: list[str], log: Callable[[str], None]) -> None:
    line = f"verify: {line} ... {'ok' if ok else 'FAILED'}"
    report.append(line)
    log(line)
    if not ok:
        raise VerificationError(line)


def export(
    net: Network,
    meta: dict[str, Any],
    verify_x: Array,
    folded: bool = True,
    model_version: str | None = None,
    log: Callable[[str], None] = print,
    drift: bool = True,
    extra_metadata: dict[str, Any] | None = None,
) -> Exported:
    """Build, verify and serialise; ``drift=False`` leaves out the drift outputs and
    ``drift_reference``; ``extra_metadata`` adds keys (e.g. ``recalibrated_from``)."""
    version = model_version or default_version(net)
    props = {**(extra_metadata or {}), **metadata(net, meta, version)}
    examples = graph.example_inputs(verify_x)  # rows that every check below runs on
    if examples is not None:
        props[graph.EXAMPLES] = examples
        props[graph.EXAMPLE_SOURCE] = (f"the first {len(examples)} rows of the validation set "
                                       "export verified on")
    model = graph.build(net, props, folded=folded, drift=drift)
    other = graph.build(net, props, folded=not folded, drift=drift)
    report: list[str] = []

    onnx.checker.check_model(model, full_check=True)
    _check(
        True, f"onnx.checker full_check (opset {graph.OPSET}, IR {graph.IR_VERSION})", report, log
    )

    model_bytes = model.SerializeToString()
    x32 = verify_x.astype(np.float32)
    sess = session(model_bytes)
    outs = run_all(sess, x32)
    probs, labels = outs[graph.OUTPUT_PROBS], outs[graph.OUTPUT_LABEL]
    # The reference sees exactly the float32 inputs the graph sees, computed in float64.
    x64 = x32.astype(np.float64)
    ref = mlp.forward_infer(net, x64)
    diff = float(np.abs(probs - ref).max())
    same = int((labels == ref.argmax(axis=1)).sum())
    _check(
        diff <= TOL and same == len(labels),
        f"onnxruntime vs numpy inference forward on {len(labels)} validation rows: "
        f"max |dp| {diff:.2e} (tol {TOL:.0e}), labels equal {same}/{len(labels)}",
        report,
        log,
    )
    drift_outputs = {n: v for n, v in outs.items() if n.startswith(drift_reference.PREFIX)}
    expected = drift_reference.network_bn_outputs(net, x64) if drift else {}
    if set(drift_outputs) != set(expected):  # cannot happen: a guard on build()
        raise VerificationError(f"drift outputs {sorted(drift_outputs)} != {sorted(expected)}")
    _check_drift(outs, expected, "batch-norm outputs z~ vs numpy inference forward", report, log)

    other_outs = run_all(session(other.SerializeToString()), x32)
    diff = float(np.abs(probs - other_outs[graph.OUTPUT_PROBS]).max())
    _check(
        diff <= TOL and bool((labels == other_outs[graph.OUTPUT_LABEL]).all()),
        f"folded vs keep-batchnorm graph: max |dp| {diff:.2e} (tol {TOL:.0e}), labels equal",
        report,
        log,
    )
    _check_drift(other_outs, {n: v.astype(np.float64) for n, v in drift_outputs.items()},
                 "folded vs keep-batchnorm graph", report, log)

    alone = [run_all(sess, x32[i : i + 1]) for i in range(len(x32))]  # one session, row by row
    n_diff = sum(
        int(not all(np.array_equal(one[n], v[i : i + 1]) for n, v in outs.items()))
        for i, one in enumerate(alone)
    )
    _check(
        n_diff == 0,
        f"each of {len(x32)} rows predicted alone vs inside the batch, all {len(outs)} outputs: "
        f"{n_diff} differ (bitwise)",
        report,
        log,
    )
    return Exported(model_bytes=model_bytes, report=report)


def default_version(net: Network) -> str:
    """A content hash of the parameters and statistics: the same model gets the same version."""
    h = hashlib.sha256()
    arrays = {**net.params, **net.stats}
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    h.update(f"{net.eps}|{net.estimator}".encode())
    return "sha-" + h.hexdigest()[:12]


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _names_arg(text: str | None, file: Path | None) -> list[str] | None:
    if file is not None:
        return [line.strip() for line in file.read_text().splitlines() if line.strip()]
    return None if text is None else [n.strip() for n in text.split(",")]


def _import(args: argparse.Namespace) -> int:
    """``--from-onnx``: fold, verify and label any ONNX model (model_export/onnx_import.py)."""
    try:
        samples = None if args.samples is None else np.load(args.samples, allow_pickle=False)
        opts = onnx_import.Options(
            output_kind=args.output_kind,
            class_names=_names_arg(args.classes, args.classes_file),
            feature_names=_names_arg(args.features, None),
            output=args.output, samples=samples, model_version=args.model_version,
            drift=not args.no_drift_outputs,
        )
        result = onnx_import.import_model(args.from_onnx, opts)
    except (onnx_import.RefusedError, onnx_verify.VerificationError, OSError, ValueError) as e:
        print(f"bnserve-export: error: {e}", file=sys.stderr)
        print("bnserve-export: nothing written", file=sys.stderr)
        return 2
    out = args.out or outputs.MODELS_DIR / f"{args.from_onnx.stem}-bnserve.onnx"
    props = {p.key: p.value for p in onnx.load_from_string(result.model_bytes).metadata_props}
    if (refused := outputs.refusal(out, outputs.origin_of(props), "model", args.force)):
        print(f"bnserve-export: error: {refused}", file=sys.stderr)
        print("bnserve-export: nothing written", file=sys.stderr)
        return 2
    write_atomic(out, result.model_bytes)
    print(f"folded in {result.fold_seconds:.2f} s")
    print(f"model written: {out}  ({len(result.model_bytes)} bytes, sha256 {result.sha256})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bnserve-export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="a bnserve-train checkpoint (default: %(default)s)")
    source.add_argument("--from-onnx", type=Path, metavar="MODEL.onnx",
                        help="any ONNX model with batch norm (opset >= 9), e.g. from "
                        "torch.onnx.export or tf2onnx: fold, verify and label it")
    p.add_argument("--out", type=Path, default=None,
                   help="default: models/<checkpoint name>.onnx (models/default.onnx for the "
                   "default checkpoint); with --from-onnx models/<name>-bnserve.onnx")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it holds another model (by default an existing "
                   "file is replaced only by a model of the same source, features and classes)")
    p.add_argument(
        "--keep-batchnorm",
        action="store_true",
        help="explicit BatchNormalization nodes instead of folding them into Gemm",
    )
    p.add_argument("--model-version", default=None, help="default: a hash of the parameters")
    p.add_argument("--no-drift-outputs", action="store_true",
                   help="write the bare interface: no drift.* monitoring outputs (each batch "
                   "norm's output, which the service watches for input drift and never returns) "
                   "and no drift_reference metadata")
    imp = p.add_argument_group("--from-onnx options")
    imp.add_argument("--output-kind", choices=onnx_import.OUTPUT_KINDS, default="logits",
                     help="logits: add Softmax and ArgMax; probabilities: add ArgMax; values: "
                     "serve the output as it is (default: %(default)s)")
    imp.add_argument("--classes", help="class names, comma-separated (default class_0, ...)")
    imp.add_argument("--classes-file", type=Path, help="class names, one per line")
    imp.add_argument("--features", help="feature names of a 1-D input, comma-separated")
    imp.add_argument("--output", help="the graph output to serve, if the model has several")
    imp.add_argument("--samples", type=Path, metavar="FILE.npy",
                     help="inputs to verify on, [n, *input shape] (default: 8 generated)")
    args = p.parse_args(argv)
    if args.from_onnx is not None:
        return _import(args)
    out = args.out or outputs.derived(args.checkpoint, ".onnx")
    try:
        net, meta, verify_x, _ = checkpoint.load(args.checkpoint)
        if (refused := outputs.refusal(out, outputs.origin_of(meta), "model", args.force)):
            raise checkpoint.CheckpointError(refused)
        result = export(
            net, meta, verify_x, folded=not args.keep_batchnorm,
            model_version=args.model_version, drift=not args.no_drift_outputs,
        )
    except (checkpoint.CheckpointError, VerificationError, onnx.checker.ValidationError) as e:
        print(f"bnserve-export: error: {e}", file=sys.stderr)
        return 2
    write_atomic(out, result.model_bytes)
    print(f"model written: {out}  ({len(result.model_bytes)} bytes, sha256 {result.sha256})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
