"""Prometheus metrics, correct with one process or several.

With several workers, each process writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR`` and
``/metrics`` (served by whichever worker gets the scrape) sums them all, so counters are never
split per worker. prometheus_client picks its storage when it is first imported, so the variable
must be set before that: ``bnserve-serve`` sets it (and wipes the directory) before any worker
starts. Without it, metrics are plain in-process values.

Each app gets its own metric objects (and registry), so tests can count from zero. Label values
are few and fixed: routes are route templates (never raw paths), statuses are HTTP codes.

Drift gauges (app/drift.py) are labelled by group (the input and each watched batch norm: a
handful) and, for 1-D inputs of at most ``MAX_DRIFT_FEATURES`` features, by feature. Each worker
keeps its own estimate of the traffic it served; with several workers the scores use
``multiprocess_mode="livemax"``: the worst live worker's estimate, so drift that any worker sees
can alert, and a dead worker's stale values drop out. A worker writes 0 until its estimate rests on
BNSERVE_DRIFT_MIN_EXAMPLES examples, so a fresh or idle worker neither hides behind nor raises an
alert. ``bnserve_drift_examples`` is ``livesum``: examples watched by all live workers.
"""

from __future__ import annotations

import os

import numpy as np
from numpy.typing import NDArray
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from app.drift import DriftReport, Reference
from app.predictor import ModelInfo

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED_ROUTE = "unmatched"  # every path no route matched shares one label value
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_DRIFT_FEATURES = 256  # per-feature drift gauges only up to this many features (bounded labels)
INFERENCE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                     0.1, 0.25)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        # no *_created series: half the output, and nothing here needs them
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess = multiprocess_dir() is not None
        reg = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "bnserve_requests", "HTTP requests answered, by route template and status code "
            "(/livez, /readyz and /metrics are not counted).", ["route", "status"], registry=reg,
        )
        self.request_seconds = Histogram(
            "bnserve_request_duration_seconds", "Time from request start to response sent, by "
            "route template.", ["route"], buckets=REQUEST_BUCKETS, registry=reg,
        )
        self.inference_seconds = Histogram(
            "bnserve_inference_duration_seconds", "ONNX Runtime time per run: one run per "
            "request, or per coalesced batch with adaptive batching on.",
            buckets=INFERENCE_BUCKETS, registry=reg,
        )
        self.batch_size = Histogram(
            "bnserve_batch_size", "Examples per ONNX Runtime run of the adaptive batcher "
            "(POST /predict with BNSERVE_BATCHING=true).", buckets=BATCH_SIZE_BUCKETS,
            registry=reg,
        )
        self.predictions = Counter(
            "bnserve_predictions", "Examples predicted, by predicted class (classifiers only).",
            ["class"],
            registry=reg,
        )
        self.in_flight = Gauge(
            "bnserve_requests_in_flight", "Requests being handled now (all workers).",
            multiprocess_mode="livesum", registry=reg,
        )
        self.model_info = Gauge(
            "bnserve_model_info", "The model being served (value 1).",
            ["model_version", "sha256", "format", "estimator", "folded"],
            multiprocess_mode="livemax", registry=reg,
        )
        self.reloads = Counter(
            "bnserve_model_reloads", "Attempts to load a changed model file beside the served "
            "one: ok (the new model serves now) or failed (the old one still does; GET /model "
            "says why).", ["result"], registry=reg,
        )
        self._reloads = {result: self.reloads.labels(result) for result in ("ok", "failed")}
        for child in self._reloads.values():
            child.inc(0)
        self._model_labels: tuple[str, ...] | None = None
        self._add_drift(reg)
        if self.multiprocess:
            self._exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._exposed)  # type: ignore[no-untyped-call]
        else:
            self._exposed = reg
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)
        # Label lookups take a lock and a dict hit; the hot path reuses the children instead.
        self._requests: dict[tuple[str, int], Counter] = {}
        self._latency: dict[str, Histogram] = {}
        self._classes: list[Counter] = []

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(route, str(status))
        child.inc()
        hist = self._latency.get(route)
        if hist is None:
            hist = self._latency[route] = self.request_seconds.labels(route)
        hist.observe(seconds)

    def count_predictions(self, labels: NDArray[np.int64]) -> None:
        if len(labels) == 1:
            self._classes[int(labels[0])].inc()
            return
        for i, n in enumerate(np.bincount(labels, minlength=len(self._classes)).tolist()):
            if n:
                self._classes[i].inc(n)

    def set_model(self, info: ModelInfo) -> None:
        # only classifiers have classes to count; a values model's answers are not counted here
        self._classes = [self.predictions.labels(name) for name in info.class_names or ()]
        for child in self._classes:
            child.inc(0)  # every class shows up in /metrics from the start, at 0
        labels = (info.model_version, info.sha256, info.metadata.get("format", ""),
                  info.metadata.get("estimator", ""), info.metadata.get("folded", ""))
        previous, self._model_labels = self._model_labels, labels
        if previous is not None and previous != labels:  # a reload: the old model is gone here
            if self.multiprocess:  # files keep every series this process wrote: zero it
                self.model_info.labels(*previous).set(0)
            else:
                self.model_info.remove(*previous)
        self.model_info.labels(*labels).set(1)

    def _add_drift(self, reg: CollectorRegistry) -> None:
        self.drift_mean_shift = Gauge(
            "bnserve_drift_mean_shift", "Drift: the worst channel's |m - mean| / std in each "
            "group (input features, or a batch norm's channels), m the served EWMA mean.",
            ["group"], multiprocess_mode="livemax", registry=reg,
        )
        self.drift_log_var_ratio = Gauge(
            "bnserve_drift_abs_log_var_ratio", "Drift: the worst channel's |log(v / std^2)| in "
            "each group, v the served EWMA variance.", ["group"], multiprocess_mode="livemax",
            registry=reg,
        )
        self.drift_feature_mean_shift = Gauge(
            "bnserve_drift_feature_mean_shift", "Drift: |m - mean| / std of each input feature "
            f"(1-D inputs of at most {MAX_DRIFT_FEATURES} features).", ["feature"],
            multiprocess_mode="livemax", registry=reg,
        )
        self.drift_feature_log_var_ratio = Gauge(
            "bnserve_drift_feature_abs_log_var_ratio", "Drift: |log(v / std^2)| of each input "
            f"feature (1-D inputs of at most {MAX_DRIFT_FEATURES} features).", ["feature"],
            multiprocess_mode="livemax", registry=reg,
        )
        self.drift_examples = Gauge(
            "bnserve_drift_examples", "Examples the drift estimates rest on (watched: every "
            "BNSERVE_DRIFT_SAMPLE_EVERY-th run), since the model was loaded (all workers).",
            multiprocess_mode="livesum", registry=reg,
        )
        self._drift_groups: list[str] = []
        self._drift_features: list[str] = []
        self._drift_input: str | None = None  # the input group's name, if features are watched

    def set_drift_model(self, reference: Reference | None, features: list[str] | None) -> None:
        """A model was published: its groups (and features) at 0, the last model's gone."""
        groups = [] if reference is None else [g.name for g in reference.groups]
        if features is not None and len(features) > MAX_DRIFT_FEATURES:
            features = None
        self._drop(self.drift_mean_shift, self.drift_log_var_ratio, self._drift_groups, groups)
        self._drop(self.drift_feature_mean_shift, self.drift_feature_log_var_ratio,
                   self._drift_features, features or [])
        self._drift_groups, self._drift_features = groups, features or []
        self._drift_input = None if reference is None or features is None else next(
            g.name for g in reference.groups if g.kind == "input")
        for gauge in (self.drift_mean_shift, self.drift_log_var_ratio):
            for g in groups:
                gauge.labels(g).set(0)
        for gauge in (self.drift_feature_mean_shift, self.drift_feature_log_var_ratio):
            for f in self._drift_features:
                gauge.labels(f).set(0)
        self.drift_examples.set(0)

    def _drop(self, a: Gauge, b: Gauge, old: list[str], new: list[str]) -> None:
        for label in set(old) - set(new):
            for gauge in (a, b):
                if self.multiprocess:  # files keep every series this process wrote: zero it
                    gauge.labels(label).set(0)
                else:
                    gauge.remove(label)

    def set_drift(self, report: DriftReport, min_examples: int) -> None:
        """This worker's estimate into the gauges (scores 0 while it rests on too few)."""
        self.drift_examples.set(report.examples)
        settled = report.examples >= max(1, min_examples)
        for g in report.groups:
            name = g.ref.name
            if name not in self._drift_groups:  # a report of a model no longer published
                return
            self.drift_mean_shift.labels(name).set(_score(g.worst_mean_shift, settled))
            self.drift_log_var_ratio.labels(name).set(_score(g.worst_abs_log_var_ratio, settled))
            if name == self._drift_input:
                shifts = g.mean_shift.tolist()
                ratios = np.abs(g.log_var_ratio).tolist()
                for f, shift, ratio in zip(self._drift_features, shifts, ratios, strict=True):
                    self.drift_feature_mean_shift.labels(f).set(_score(shift, settled))
                    self.drift_feature_log_var_ratio.labels(f).set(_score(ratio, settled))

    def count_reload(self, ok: bool) -> None:
        self._reloads["ok" if ok else "failed"].inc()

    def render(self) -> bytes:
        data: bytes = generate_latest(self._exposed)
        return data

    def close(self) -> None:
        """This process is going away: drop its samples of live gauges (in-flight, model info)."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def _score(value: float, settled: bool) -> float:
    """A gauge's value: 0 for a skipped channel (NaN) or an estimate on too few examples."""
    return value if settled and np.isfinite(value) else 0.0
