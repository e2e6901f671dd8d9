"""What the running service knows: settings, metrics, readiness, (once warm) the model, and the
model file it came from with the last reload attempt.

Drift monitoring belongs to the model: publishing a model (``rt.model = ...``, on the first load
and on every hot reload) gives it a fresh ``DriftMonitor`` on its own reference, so an estimate
never mixes what two models saw."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

from app import answers, inputs, tensors
from app.drift import DriftMonitor, DriftReport
from app.inputs import F32, FeatureSpec
from app.logs import AccessLog
from app.metrics import Metrics
from app.predictor import ModelInfo, Outputs, Predictor
from app.settings import Settings
from app.tensors import ShapeSpec


class Readiness:
    """Ready = model loaded, interface checked, warmed up, and shutdown not begun.

    Plain attribute writes only, so a signal handler may flip it safely at any moment.
    """

    def __init__(self) -> None:
        self.ready = False
        self.reason = "starting"
        self.shutting_down = False

    def not_ready(self, reason: str) -> None:
        self.ready = False
        self.reason = reason

    def set_ready(self) -> None:
        if not self.shutting_down:
            self.ready = True
            self.reason = "ready"

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        self.ready = False
        self.reason = "shutting down"


Decode = Callable[[Any], F32]  # a parsed request body -> float32 model input


@dataclass(frozen=True)
class Model:
    """A warm predictor and what requests need from it, published in one attribute write:
    the request decoders for its input shape and the answer encoder for its output kind."""

    predictor: Predictor
    version: str
    classifier: bool  # answers name a class (and metrics count them), else raw values
    class_names: tuple[str, ...] | None
    single: Decode  # the parsed body of POST /predict -> float32 [1, ...]
    batch: Decode  # of POST /predict/batch -> float32 [N, ...]
    answer: Callable[[Outputs, bool], bytes]  # (outputs, batch?) -> the JSON answer
    drift: DriftMonitor | None = None  # None: not monitored (off, or the model has no reference)

    @classmethod
    def of(cls, predictor: Predictor, max_batch: int) -> Model:
        info = predictor.info
        version = info.model_version
        single, batch = _decoders(info, max_batch)
        if info.class_names is None:
            return cls(predictor, version, False, None, single, batch,
                       partial(answers.values, version))
        names = tuple(info.class_names)
        return cls(predictor, version, True, names, single, batch,
                   partial(answers.classes, names, version))


def _decoders(info: ModelInfo, max_batch: int) -> tuple[Decode, Decode]:
    """(single, batch) request decoders for the model's input shape. Closures, not
    ``partial(..., spec=spec)``: a partial with keywords costs 0.3 us more per call."""
    if info.feature_names is not None:  # 1-D examples: a list, or an object by name
        spec = FeatureSpec(info.feature_names)

        def single(doc: Any) -> F32:
            return inputs.single_example(doc, spec)

        def batch(doc: Any) -> F32:
            return inputs.batch_examples(doc, spec, max_batch)

        return single, batch
    shape = ShapeSpec(info.input_shape)  # nested lists of the input's shape

    def single_nd(doc: Any) -> F32:
        return tensors.single_example(doc, shape)

    def batch_nd(doc: Any) -> F32:
        return tensors.batch_examples(doc, shape, max_batch)

    return single_nd, batch_nd


def monitored(model: Model, settings: Settings) -> Model:
    """``model`` with a fresh drift monitor, if monitoring is on and the model has a reference."""
    reference = model.predictor.info.drift
    if model.drift is not None or not settings.drift or reference is None:
        return model
    return replace(model, drift=DriftMonitor(reference, settings.drift_watched_time_constant))


def drift_features(info: ModelInfo) -> list[str] | None:
    """Per-feature drift gauges' label values: 1-D inputs with a watched input group only."""
    ref = info.drift
    group = None if ref is None else next((g for g in ref.groups if g.kind == "input"), None)
    if group is None or len(info.input_shape) != 1:
        return None
    return list(group.channel_names or info.feature_names or map(str, range(group.channels)))


class Fingerprint(NamedTuple):
    """What ``stat`` says of the model file (following symbolic links, so a Kubernetes volume
    update, which swaps a symlink, shows up as a new inode). Any change means: look again."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> Fingerprint | None:
        """None if the file cannot be stat'ed (missing, or being replaced non-atomically)."""
        try:
            st = path.stat()
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class ReloadAttempt:
    """The last time a changed model file was loaded beside the served model (GET /model)."""

    at: str  # ISO 8601 UTC
    result: Literal["ok", "failed"]
    reason: str  # "<old version> -> <new version>", or why the new file was refused
    model_version: str | None  # the version served after the attempt

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "result": self.result, "reason": self.reason,
                "model_version": self.model_version}


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    readiness: Readiness = field(default_factory=Readiness)
    access_log: AccessLog = field(init=False)
    # stat of the model file at the last load attempt (first load or reload), ok or not
    model_file: Fingerprint | None = None
    last_reload: ReloadAttempt | None = None
    _model: Model | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.access_log = AccessLog(self.settings.log_level, self.settings.log_format)

    @property
    def model(self) -> Model | None:
        """None until the model is loaded and warm. Requests are served whenever it is set, also
        while shutting down, so that in-flight and draining requests still succeed."""
        return self._model

    @model.setter
    def model(self, model: Model | None) -> None:
        """Publish ``model`` (one attribute write), with a fresh drift monitor if it is watched."""
        if model is not None:
            model = monitored(model, self.settings)
            info = model.predictor.info
            self.metrics.set_drift_model(
                None if model.drift is None else model.drift.reference, drift_features(info))
        self._model = model

    def publish_drift(self) -> DriftReport | None:
        """The served model's drift report, also written to this worker's drift gauges."""
        model = self._model
        if model is None or model.drift is None:
            return None
        report = model.drift.report()
        self.metrics.set_drift(report, self.settings.drift_min_examples)
        return report
