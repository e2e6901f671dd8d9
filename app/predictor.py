"""The ONNX Runtime session: load a bnserve ONNX file, check its interface, warm it up, predict.

No HTTP here. ``Predictor.load`` refuses (``ModelError``) any file that is missing, unreadable,
not a regular file, over the size limit, not ONNX, or without the interface ``bnserve-export``
writes:

    input   features       float32 [N, d1, ..., dk]: k >= 1, d1..dk fixed, N the batch
    output_kind "classifier" (also when the key is absent: files written before issue 9)
      output  probabilities  float32 [N, n_classes]
      output  label          int64   [N]
    output_kind "values" (regression, embeddings, image-to-image)
      output  values         float32 [N, ...], the only output
    metadata format "bnserve-onnx/1", model_version, class_names (classifiers only),
             feature_names (only when examples are 1-D, [N, F]); optional fold_report, source
    optional drift_reference (app/drift.py) and the monitoring outputs it declares:
      output  drift.<group>  float32 [N, C, ...]: hidden from clients (not in ``info.outputs``),
              run beside the answer only when the service monitors drift (``predict_watched``)

``warm_up`` runs the graph on random examples of the input's shape and checks what comes out
(every output finite; for a classifier, probabilities in [0, 1] summing to 1 and label = argmax;
each example alone bit-identical to the same example inside a batch), so a model that would
serve garbage never becomes ready. Monitoring outputs are held to the same checks (finite, and
batch-independent), since their statistics are only meaningful if they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import stat
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from app import drift

# Errors only from ORT's process-wide logger too: its warnings (e.g. that a read-only root cannot
# keep a telemetry id) bypass our log format, and the session options below come too late for them.
ort.set_default_logger_severity(3)

# The interface written by model_export (not imported: serving does not need onnx).
FORMAT = "bnserve-onnx/1"
INPUT = "features"
OUTPUT_PROBS = "probabilities"
OUTPUT_LABEL = "label"
OUTPUT_VALUES = "values"
CLASSIFIER = "classifier"
VALUES = "values"
OUTPUT_KINDS = (CLASSIFIER, VALUES)
_JSON_KEYS = ("feature_names", "class_names", "hidden", "eps", "beta_avg", "train_accuracy",
              "val_accuracy", "n_train", "n_val", "opset", "fold_report")

F32 = NDArray[np.float32]
Outputs = tuple[NDArray[Any], ...]  # in the order of Predictor.output_names, batch first


class ModelError(Exception):
    """The model file cannot be served; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, int64
    shape: list[str | int]  # symbolic dimensions keep their name, e.g. ["N", 30]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}


@dataclass(frozen=True)
class ModelInfo:
    path: str
    sha256: str
    size_bytes: int
    model_version: str
    output_kind: str  # CLASSIFIER or VALUES
    input_shape: tuple[int, ...]  # one example's dimensions, without the batch
    feature_names: list[str] | None  # 1-D examples only
    class_names: list[str] | None  # classifiers only
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metadata: dict[str, str]  # the file's metadata_props, verbatim
    parsed: dict[str, Any]  # the same, with JSON values decoded
    drift: drift.Reference | None  # what drift monitoring compares with; None: no reference
    monitoring_outputs: list[TensorSpec]  # the drift.* outputs, never shown to clients
    intra_op_threads: int
    inter_op_threads: int
    loaded_at: str = ""
    load_seconds: float = 0.0
    warm_up_seconds: float = 0.0

    @property
    def fold_report(self) -> dict[str, Any] | None:
        report: dict[str, Any] | None = self.parsed.get("fold_report")
        return report

    @property
    def source(self) -> str | None:
        return self.metadata.get("source")

    def drift_document(self, time_constant: float | None, sample_every: int
                       ) -> dict[str, Any] | None:
        """GET /model's ``drift`` section: what is watched (None: the model has no reference)."""
        if self.drift is None:
            return None
        return {"monitoring": time_constant is not None, "time_constant": time_constant,
                "sample_every": sample_every if time_constant is not None else None,
                "groups": [{"name": g.name, "kind": g.kind, "tensor": g.tensor,
                            "channels": g.channels, "skipped_channels": int(g.dead.sum())}
                           for g in self.drift.groups]}


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(double)": "float64",
               "tensor(int32)": "int32"}


def _spec(node: Any) -> TensorSpec:
    shape = [d if isinstance(d, int) else str(d) for d in node.shape]
    return TensorSpec(node.name, _ORT_DTYPES.get(node.type, node.type), shape)


def _decode(meta: dict[str, str]) -> dict[str, Any]:
    parsed: dict[str, Any] = dict(meta)
    for key in _JSON_KEYS:
        if key in meta:
            with contextlib.suppress(ValueError):  # else keep the raw string
                parsed[key] = json.loads(meta[key])
    if "folded" in meta:
        parsed["folded"] = meta["folded"] == "true"
    return parsed


def _names(parsed: dict[str, Any], key: str) -> list[str]:
    value = parsed.get(key)
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str) and v for v in value)
    ):
        raise ModelError(f"metadata {key!r} must be a JSON list of non-empty strings, got "
                         f"{str(value)[:80]!r}")
    if len(set(value)) != len(value):
        raise ModelError(f"metadata {key!r} has duplicate names")
    return value


def _input_shape(inputs: list[TensorSpec]) -> tuple[int, ...]:
    """One example's dimensions: the input's shape after the batch, every one a fixed size."""
    if len(inputs) != 1 or inputs[0].name != INPUT:
        raise ModelError(f"inputs are {[i.name for i in inputs]}, expected exactly [{INPUT!r}]")
    inp = inputs[0]
    if inp.dtype != "float32" or len(inp.shape) < 2:
        raise ModelError(f"input {INPUT!r} is {inp.dtype} {inp.shape}, expected float32 "
                         "[N, d1, ..., dk] (e.g. [N, 30] or [N, 3, 32, 32])")
    batch, *dims = inp.shape
    if isinstance(batch, int):
        raise ModelError(f"input {INPUT!r} has shape {inp.shape}: its first (batch) dimension "
                         "is fixed; it must be dynamic (bnserve-export makes it so)")
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise ModelError(f"input {INPUT!r} has shape {inp.shape}: every dimension after the "
                         "batch must be a fixed positive size")
    return tuple(int(d) for d in dims)


def _check_classifier(outputs: list[TensorSpec], parsed: dict[str, Any]) -> list[str]:
    classes = _names(parsed, "class_names")
    if len(classes) < 2:
        raise ModelError(f"metadata 'class_names' has {len(classes)} class; expected at least 2")
    by_name = {o.name: o for o in outputs}
    for name, dtype, rank in ((OUTPUT_PROBS, "float32", 2), (OUTPUT_LABEL, "int64", 1)):
        out = by_name.get(name)
        if out is None:
            raise ModelError(f"output {name!r} is missing; outputs are {list(by_name)}")
        if out.dtype != dtype or len(out.shape) != rank:
            raise ModelError(f"output {name!r} is {out.dtype} of rank {len(out.shape)}, "
                             f"expected {dtype} of rank {rank}")
    if by_name[OUTPUT_PROBS].shape[1] != len(classes):
        raise ModelError(f"output {OUTPUT_PROBS!r} has {by_name[OUTPUT_PROBS].shape[1]} classes "
                         f"but metadata class_names has {len(classes)}")
    return classes


def _check_values(outputs: list[TensorSpec]) -> None:
    if [o.name for o in outputs] != [OUTPUT_VALUES]:
        raise ModelError(f"outputs are {[o.name for o in outputs]}, expected exactly "
                         f"[{OUTPUT_VALUES!r}] for output_kind {VALUES!r}")
    out = outputs[0]
    if out.dtype != "float32" or not out.shape:
        raise ModelError(f"output {OUTPUT_VALUES!r} is {out.dtype} {out.shape}, expected "
                         "float32 [N, ...]")


def _check_drift(meta: dict[str, str], monitoring: list[TensorSpec],
                 shape: tuple[int, ...]) -> drift.Reference | None:
    """The reference, checked against the graph: every drift.* output declared in it and
    every group's tensor there, float32 [N, C, ...] with C its number of channels."""
    text = meta.get(drift.KEY)
    names = [o.name for o in monitoring]
    if text is None:
        if names:
            raise ModelError(f"outputs {names} are monitoring outputs ({drift.PREFIX}*) but "
                             f"metadata {drift.KEY!r} is missing")
        return None
    try:
        ref = drift.Reference.parse(text)
    except ValueError as e:
        raise ModelError(f"metadata {e}") from None
    undeclared = sorted(set(names) - set(ref.tensors))
    if undeclared:
        raise ModelError(f"outputs {undeclared} are monitoring outputs ({drift.PREFIX}*) not "
                         f"declared in metadata {drift.KEY!r}")
    by_name = {o.name: o for o in monitoring}
    for g in ref.groups:
        if g.kind == "input":
            if g.tensor != INPUT or shape[0] != g.channels:
                raise ModelError(f"{drift.KEY} group {g.name!r} watches {g.tensor!r} with "
                                 f"{g.channels} channels; the input is {INPUT!r} with "
                                 f"{shape[0]} on axis 1")
            continue
        out = by_name.get(g.tensor)
        if out is None:
            raise ModelError(f"{drift.KEY} group {g.name!r} watches output {g.tensor!r}, "
                             f"which the graph does not have")
        channels = out.shape[1] if len(out.shape) >= 2 else None
        if out.dtype != "float32" or channels is None or (
                isinstance(channels, int) and channels != g.channels):  # symbolic: warm-up checks
            raise ModelError(f"output {out.name!r} is {out.dtype} {out.shape}, expected "
                             f"float32 [N, {g.channels}, ...] (group {g.name!r})")
    return ref


def _check_interface(session: Any, meta: dict[str, str]) -> ModelInfo:
    """Everything the service relies on, or ModelError naming the first thing that is wrong."""
    if meta.get("format") != FORMAT:
        raise ModelError(f"metadata format is {meta.get('format')!r}, expected {FORMAT!r} "
                         "(a file written by bnserve-export)")
    parsed = _decode(meta)
    version = meta.get("model_version", "")
    if not version:
        raise ModelError("metadata 'model_version' is missing or empty")
    kind = meta.get("output_kind", CLASSIFIER)
    if kind not in OUTPUT_KINDS:
        raise ModelError(f"metadata 'output_kind' is {kind!r}, expected one of "
                         f"{list(OUTPUT_KINDS)}")
    if "fold_report" in meta and not isinstance(parsed["fold_report"], dict):
        raise ModelError("metadata 'fold_report' must be a JSON object")

    inputs = [_spec(i) for i in session.get_inputs()]
    every = [_spec(o) for o in session.get_outputs()]
    outputs = [o for o in every if not o.name.startswith(drift.PREFIX)]
    monitoring = [o for o in every if o.name.startswith(drift.PREFIX)]
    shape = _input_shape(inputs)
    reference = _check_drift(meta, monitoring, shape)
    features = None
    if len(shape) == 1:  # names only make sense for 1-D examples; requests may use them
        features = _names(parsed, "feature_names")
        if shape[0] != len(features):
            raise ModelError(f"input {INPUT!r} has {shape[0]} features but metadata "
                             f"feature_names has {len(features)}")
    classes = None
    if kind == CLASSIFIER:
        classes = _check_classifier(outputs, parsed)
    else:
        _check_values(outputs)
    return ModelInfo(
        path="", sha256="", size_bytes=0, model_version=version, output_kind=kind,
        input_shape=shape, feature_names=features, class_names=classes, inputs=inputs,
        outputs=outputs, metadata=dict(meta), parsed=parsed, drift=reference,
        monitoring_outputs=monitoring, intra_op_threads=0, inter_op_threads=0,
    )


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def read_model_file(path: Path, max_bytes: int | None = None) -> bytes:
    """The file's bytes. Refused before a byte is read (``ModelError``): a missing path, anything
    but a regular file (a FIFO would block the read, a device might never end), a file over
    ``max_bytes`` (BNSERVE_MAX_MODEL_BYTES). Symbolic links are followed. A network filesystem
    that hangs still blocks here, even in ``stat``: callers run this off the event loop, in a
    thread that shutdown does not wait for (app/reload.py)."""
    name = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelError(f"model file {name!r} does not exist (BNSERVE_MODEL_PATH; a relative "
                         "path is taken from the working directory)") from None
    except OSError as e:
        raise ModelError(f"cannot read model file {name!r}: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a regular file")
        raise ModelError(f"model file {name!r} is {kind}, not a regular file: bnserve reads "
                         "models only from regular files (or symbolic links to them)")
    if max_bytes is not None and st.st_size > max_bytes:
        raise ModelError(f"model file {name!r} is {st.st_size} bytes, over the limit of "
                         f"{max_bytes} bytes (BNSERVE_MAX_MODEL_BYTES)")
    try:
        with path.open("rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as e:
        raise ModelError(f"cannot read model file {name!r}: {e}") from None
    except MemoryError:
        raise ModelError(f"not enough memory to read model file {name!r} ({st.st_size} "
                         "bytes)") from None
    if max_bytes is not None and len(data) > max_bytes:  # it grew after the stat
        raise ModelError(f"model file {name!r} is over the limit of {max_bytes} bytes "
                         "(BNSERVE_MAX_MODEL_BYTES)")
    return data


class Predictor:
    def __init__(self, session: Any, info: ModelInfo) -> None:
        self._session = session
        self.info = info
        self.classifier = info.output_kind == CLASSIFIER
        self.output_names = [OUTPUT_PROBS, OUTPUT_LABEL] if self.classifier else [OUTPUT_VALUES]
        self.input_shape = info.input_shape
        self.n_classes = len(info.class_names or ())
        # the answer's outputs, then the monitoring ones: one run computes both
        self.watched_names = [o.name for o in info.monitoring_outputs]
        self._all_names = self.output_names + self.watched_names
        self._n_out = len(self.output_names)
        # where each tensor the reference watches is in [x, *run outputs]
        self._watched_at = [] if info.drift is None else [
            0 if t == INPUT else 1 + self._all_names.index(t) for t in info.drift.watched]

    @classmethod
    def load(
        cls, path: Path, intra_op_threads: int = 1, inter_op_threads: int = 1,
        max_bytes: int | None = None,
    ) -> Predictor:
        t0 = time.perf_counter()
        data = read_model_file(path, max_bytes)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: ORT warnings would bypass our log format
        # Spinning threads burn CPU between requests that the event loop and other workers need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            # From the bytes just hashed, so the sha256 reported is the model that runs.
            session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
            meta = dict(session.get_modelmeta().custom_metadata_map)
        except MemoryError:
            raise ModelError(f"not enough memory to load model file {str(path)!r} "
                             f"({len(data)} bytes)") from None
        except Exception as e:  # ORT raises its own exception types for corrupt files
            raise ModelError(f"model file {str(path)!r} is not a loadable ONNX model: "
                             f"{_first_line(e)}") from None
        try:
            info = _check_interface(session, meta)
        except ModelError as e:
            raise ModelError(f"model file {str(path)!r} has the wrong interface: {e}") from None
        info = replace(
            info, path=str(path), sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
            intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads,
            loaded_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            load_seconds=time.perf_counter() - t0,
        )
        return cls(session, info)

    def predict(self, x: F32) -> Outputs:
        """float32 [N, *input_shape] -> the outputs, [N, ...] each: (probabilities float32
        [N, n_classes], label int64 [N]) for a classifier, (values float32 [N, ...],) else."""
        return tuple(self._session.run(self.output_names, {INPUT: x}))

    def predict_watched(self, x: F32) -> tuple[Outputs, dict[str, F32]]:
        """``predict``'s outputs and, from the same run, what drift monitoring watches: the
        input and each monitoring output, by tensor name."""
        outputs, watched = self.run_watched(x)
        assert self.info.drift is not None, "the model has no drift reference"
        return outputs, dict(zip(self.info.drift.watched, watched, strict=True))

    def run_watched(self, x: F32) -> tuple[Outputs, list[F32]]:
        """``predict_watched`` for the request path: the watched tensors in the order of
        ``info.drift.watched`` (``DriftMonitor.observe_watched``), no dictionary built."""
        every = [x, *self._session.run(self._all_names, {INPUT: x})]
        return tuple(every[1 : 1 + self._n_out]), [every[i] for i in self._watched_at]

    def warm_up(self, max_batch: int) -> None:
        """Run every code path once and refuse a model whose outputs make no sense."""
        try:
            self._warm_up(max_batch)
        except ModelError as e:
            path = self.info.path
            raise ModelError(f"model file {path!r} failed the warm-up check: {e}") from None

    def _warm_up(self, max_batch: int) -> None:
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        n = max(2, min(max_batch, 8))
        shape = self.input_shape
        x = np.concatenate([np.zeros((1, *shape)), rng.normal(size=(n - 1, *shape))])
        x = x.astype(np.float32)
        outs = self._checked(x)
        for i in range(n):
            alone = self._checked(x[i : i + 1])
            if not all(np.array_equal(a[0], o[i]) for a, o in zip(alone, outs, strict=True)):
                raise ModelError(f"example {i} gives a different answer alone than inside a "
                                 f"batch of {n}: the graph is not in inference mode")
        if max_batch > n:  # the largest batch a request may send: still example by example
            big = self._checked(np.resize(x, (max_batch, *shape)))
            rows = np.arange(max_batch) % n
            if not all(np.array_equal(b, o[rows]) for b, o in zip(big, outs, strict=True)):
                raise ModelError(f"examples give different answers inside a batch of "
                                 f"{max_batch} than inside a batch of {n}")
        self.info = replace(self.info, warm_up_seconds=time.perf_counter() - t0)

    def _checked(self, x: F32) -> Outputs:
        """The answer's outputs then the monitoring outputs, each checked."""
        try:
            every = tuple(self._session.run(self._all_names, {INPUT: x}))
        except Exception as e:  # e.g. a Reshape that hard-codes the batch size
            raise ModelError(f"running a batch of {len(x)} failed: {_first_line(e)}") from None
        outs = every[: self._n_out]
        if self.classifier:
            _check_classes(outs, len(x), self.n_classes)
        else:
            _check_values_out(outs, len(x))
        ref = self.info.drift
        for name, out in zip(self.watched_names, every[self._n_out:], strict=True):
            assert ref is not None  # monitoring outputs exist only with a reference
            channels = next(g.channels for g in ref.groups if g.tensor == name)
            _check_monitoring_out(name, out, len(x), channels)
        return every


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_classes(outs: Outputs, n: int, n_classes: int) -> None:
    probs, labels = outs
    if probs.dtype != np.float32 or probs.shape != (n, n_classes):
        raise ModelError(f"probabilities came out {probs.dtype} {probs.shape}, expected "
                         f"float32 {(n, n_classes)}")
    if labels.dtype != np.int64 or labels.shape != (n,):
        raise ModelError(f"labels came out {labels.dtype} {labels.shape}, expected int64 {(n,)}")
    if not (np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()):
        raise ModelError("probabilities are not all finite and within [0, 1]")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise ModelError("probabilities do not sum to 1")
    if not ((labels >= 0) & (labels < n_classes)).all() or not np.array_equal(
        probs[np.arange(n), labels], probs.max(axis=1)
    ):
        raise ModelError("label is not the most probable class")


def _check_monitoring_out(name: str, out: NDArray[Any], n: int, channels: int) -> None:
    if out.dtype != np.float32 or out.ndim < 2 or out.shape[:2] != (n, channels):
        raise ModelError(f"monitoring output {name!r} came out {out.dtype} {out.shape}, "
                         f"expected float32 [{n}, {channels}, ...]")
    if not np.isfinite(out).all():
        raise ModelError(f"monitoring output {name!r} is not all finite on random inputs")


def _check_values_out(outs: Outputs, n: int) -> None:
    (values,) = outs
    if values.dtype != np.float32 or values.ndim < 1 or len(values) != n:
        raise ModelError(f"values came out {values.dtype} {values.shape}, expected float32 "
                         f"[{n}, ...]")
    if not np.isfinite(values).all():
        raise ModelError("values are not all finite on random inputs")
