"""The data plane: a float32 tensor in, the model's outputs out, whatever protocol asked.

One ONNX Runtime call per request, or, for a single example with adaptive batching on, a share
of one (app/batching.py). Every protocol's requests come through ``infer`` after their codec has
decoded them (app/codecs/), so an example's answer cannot depend on the front door it used.
"""

from __future__ import annotations

from time import perf_counter

from app.batching import Batcher
from app.predictor import F32, Outputs
from app.state import Model, Runtime


class DataPlane:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.metrics = rt.metrics
        s = rt.settings
        self.batcher: Batcher | None = None
        if s.batching:  # runs never exceed max_batch rows: the largest size warm-up checks
            self.batcher = Batcher(self._run_batch, min(s.batch_max_size, s.max_batch),
                                   s.batch_max_wait_ms / 1000)

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
        t0 = perf_counter()
        outputs = model.predictor.predict(x)
        self.metrics.inference_seconds.observe(perf_counter() - t0)
        return outputs

    def _run_batch(self, x: F32) -> Outputs:
        self.metrics.batch_size.observe(len(x))
        model = self.rt.model
        assert model is not None  # a run only holds rows of requests that found a model
        return self._run(model, x)
