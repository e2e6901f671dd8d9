"""The data plane: a float32 tensor in, the model's outputs out, whatever protocol asked.

One ONNX Runtime call per request, or, for a single example with adaptive batching on, a share
of one (app/batching.py). Every protocol's requests come through ``infer`` after their codec has
decoded them (app/codecs/), so an example's answer cannot depend on the front door it used.

``_run`` is also where drift monitoring watches what is served (app/drift.py): every ONNX Runtime
run of valid, decoded examples (one request, a /predict/batch, or a coalesced batch), or every
k-th with BNSERVE_DRIFT_SAMPLE_EVERY, also returns the monitoring outputs; the monitor only
buffers them (folding happens in blocks). Requests refused while decoding never get here, so they
never count. Once a second a daemon thread writes this worker's estimate to its gauges (with
several workers each writes its own; the scrape combines them), so they lag by at most that, also
when the worker is idle.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from time import perf_counter

from app.batching import Batcher
from app.drift import DriftMonitor
from app.predictor import F32, Outputs
from app.state import Model, Runtime

PUBLISH_SECONDS = 1.0  # how often a worker writes its drift estimate to its gauges


class DataPlane:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.metrics = rt.metrics
        s = rt.settings
        self.batcher: Batcher | None = None
        if s.batching:  # runs never exceed max_batch rows: the largest size warm-up checks
            self.batcher = Batcher(self._run_batch, min(s.batch_max_size, s.max_batch),
                                   s.batch_max_wait_ms / 1000)
        self._sample_every = s.drift_sample_every
        self._runs = itertools.count()
        self._publisher: threading.Thread | None = None

    async def infer(self, model: Model, x: F32, single: bool) -> Outputs:
        """``model``'s outputs for ``x``: the model the request was decoded for and will be
        answered as (a reload may switch ``rt.model`` while its body arrives)."""
        if not single or self.batcher is None:
            outputs = self._run(model, x)
        else:  # only a decoded, valid example gets here to join a batch
            outputs = await self.batcher.predict(x)
            if self.rt.model is not model:  # a reload landed while it waited: the run may have
                outputs = self._run(model, x)  # used the new model; answer on its own model
        return outputs

    def answered(self, model: Model, outputs: Outputs) -> None:
        """Count the classes of outputs that made it into an answer."""
        if model.classifier and model is self.rt.model:  # the class counters are the model's
            self.metrics.count_predictions(outputs[1])

    def _run(self, model: Model, x: F32) -> Outputs:
        monitor = model.drift
        if monitor is not None and next(self._runs) % self._sample_every == 0:
            return self._run_watched(model, monitor, x)
        t0 = perf_counter()
        outputs = model.predictor.predict(x)
        self.metrics.inference_seconds.observe(perf_counter() - t0)
        return outputs

    def _run_watched(self, model: Model, monitor: DriftMonitor, x: F32) -> Outputs:
        t0 = perf_counter()
        outputs, watched = model.predictor.run_watched(x)
        self.metrics.inference_seconds.observe(perf_counter() - t0)
        monitor.observe_watched(watched)
        if self._publisher is None:  # started by the first watched run, not before
            self._publisher = threading.Thread(target=_publish, args=(weakref.ref(self.rt),),
                                               name="bnserve-drift-gauges", daemon=True)
            self._publisher.start()
        return outputs

    def _run_batch(self, x: F32) -> Outputs:
        self.metrics.batch_size.observe(len(x))
        model = self.rt.model
        assert model is not None  # a run only holds rows of requests that found a model
        return self._run(model, x)


def _publish(rt_ref: weakref.ref[Runtime]) -> None:
    """Every PUBLISH_SECONDS, the served model's drift estimate into this worker's gauges;
    ends when the runtime is gone (a weak reference: the thread keeps no app alive) or shuts
    down (with several workers, a write after the process is marked dead would leave its
    gauges behind)."""
    stop = threading.Event()  # never set: a sleep that is not a busy loop
    while not stop.wait(PUBLISH_SECONDS):
        rt = rt_ref()
        if rt is None or rt.readiness.shutting_down:
            return
        rt.publish_drift()
        del rt
