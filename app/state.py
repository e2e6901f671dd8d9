"""What the running service knows: settings, metrics, readiness and (once warm) the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.inputs import F32, FeatureSpec, batch_examples, single_example
from app.logs import AccessLog
from app.metrics import Metrics
from app.predictor import Predictor
from app.settings import Settings


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


@dataclass(frozen=True)
class Model:
    """A warm predictor and what requests need from it, published in one attribute write."""

    predictor: Predictor
    spec: FeatureSpec
    class_names: tuple[str, ...]
    version: str
    max_batch: int

    @classmethod
    def of(cls, predictor: Predictor, max_batch: int) -> Model:
        info = predictor.info
        return cls(predictor, FeatureSpec(info.feature_names), tuple(info.class_names),
                   info.model_version, max_batch)

    def single(self, doc: Any) -> F32:
        return single_example(doc, self.spec)

    def batch(self, doc: Any) -> F32:
        return batch_examples(doc, self.spec, self.max_batch)


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    readiness: Readiness = field(default_factory=Readiness)
    access_log: AccessLog = field(init=False)
    # None until the model is loaded and warm. Requests are served whenever it is set, also
    # while shutting down, so that in-flight and draining requests still succeed.
    model: Model | None = None

    def __post_init__(self) -> None:
        self.access_log = AccessLog(self.settings.log_level, self.settings.log_format)
