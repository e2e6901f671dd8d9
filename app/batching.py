"""Adaptive batching: concurrent single-example predictions share one ONNX Runtime run.

Batch norm in inference mode is a fixed affine map per example, so an example's answer does not
depend on the examples it shares a run with, whatever the input's shape and the output's kind
(warm-up checks this bit for bit, app/predictor.py); coalescing only saves the per-run overhead,
which for a large model is most of the cost of an example. Runs are concatenations along the
batch dimension; each caller gets its own slice of every output back.

Everything happens on the event loop, without a thread hop: handing a run to a worker thread and
back cost about 80 us on the benchmark machine, against 6 to 13 us for the default model's whole
run. Requests whose bodies arrive in the same event-loop iteration run one after another inside
that iteration, so the rule is:

- The first request of an iteration, with nothing queued, runs at once, inline: no timer, no
  future, nothing to wait for (at concurrency 1 batching costs a flag check and one loop callback
  per request, about 1 us).
- A request that finds another one already served or queued in the same iteration joins the
  queue. The queue runs as one batch at the end of the iteration (``max_wait`` 0, the default),
  or after ``max_wait`` so that later iterations can add to it, or at once when it holds
  ``max_size`` rows.

Only parsed, valid rows are ever queued, so a malformed request never enters a batch. If a run
fails, each of its rows is run again alone, so a failure reaches only the callers whose rows
cause it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from app.predictor import F32, Outputs

Run = Callable[[F32], Outputs]  # float32 [N, ...] -> the model's outputs, [N, ...] each
_Waiter = tuple[F32, "asyncio.Future[Outputs]"]


class Batcher:
    def __init__(self, run: Run, max_size: int, max_wait_seconds: float) -> None:
        self.run = run
        self.max_size = max_size
        self.max_wait = max_wait_seconds
        self.timers_armed = 0  # how often a queue was held for max_wait (tests read it)
        self._queue: list[_Waiter] = []
        self._timer: asyncio.Handle | None = None
        self._busy_turn = False  # a request was already served or queued in this iteration

    async def predict(self, x: F32) -> Outputs:
        """One valid example (float32 [1, ...]) -> its outputs ([1, ...] each)."""
        loop = asyncio.get_running_loop()
        if not self._busy_turn:
            self._busy_turn = True
            loop.call_soon(self._end_turn)  # runs after every request ready in this iteration
            if not self._queue:
                return self.run(x)  # alone so far: run at once, no wait of any kind
        future: asyncio.Future[Outputs] = loop.create_future()
        self._queue.append((x, future))
        if len(self._queue) >= self.max_size:
            self._flush()
        elif self._timer is None and self.max_wait > 0:
            self.timers_armed += 1
            self._timer = loop.call_later(self.max_wait, self._flush)
        return await future

    def _end_turn(self) -> None:
        self._busy_turn = False
        if self._timer is None and self._queue:  # max_wait 0: the iteration's company is all in
            self._flush()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue, self._queue = self._queue, []
        for start in range(0, len(queue), self.max_size):
            self._run_batch([w for w in queue[start : start + self.max_size]
                             if not w[1].done()])  # a cancelled caller needs no answer

    def _run_batch(self, waiters: list[_Waiter]) -> None:
        if not waiters:
            return
        try:
            outputs = self.run(np.concatenate([x for x, _ in waiters]))
        except Exception as e:
            if len(waiters) == 1:
                waiters[0][1].set_exception(e)
                return
            for waiter in waiters:  # isolate the row(s) that fail
                self._run_batch([waiter])
            return
        for i, (_, future) in enumerate(waiters):
            future.set_result(tuple(out[i : i + 1] for out in outputs))

