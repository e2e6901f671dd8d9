"""The floor: ONNX Runtime's own ``run`` for one example, in-process, with bnserve's session
options (app/predictor.py) and its thread count, so no HTTP, JSON or Python service code; and
the same per row in a run of 64 rows, the most adaptive batching can bring it down to."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from app.predictor import Predictor
from app.settings import Settings


def measure(model: Path, x: np.ndarray, seconds: float = 2.0) -> dict[str, float]:
    """Median and p99 of one-example runs over ``seconds``, cycling through the rows of ``x``."""
    intra, inter = Settings(workers=1).threads()
    predictor = Predictor.load(model, intra, inter)
    rows = [x[i : i + 1].astype(np.float32) for i in range(len(x))]
    for row in rows[:50]:
        predictor.predict(row)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline:
        row = rows[i % len(rows)]
        t0 = time.perf_counter()
        predictor.predict(row)
        times.append(time.perf_counter() - t0)
        i += 1
    us = np.array(times) * 1e6
    # One run of 64 rows, per row: what a full batch leaves of the inference cost per request.
    batch = np.concatenate(rows[:64] * (64 // len(rows[:64]) + 1))[:64]
    batch_times = []
    for _ in range(200):
        t0 = time.perf_counter()
        predictor.predict(batch)
        batch_times.append(time.perf_counter() - t0)
    return {"runs": len(us), "p50_us": float(np.percentile(us, 50)),
            "p99_us": float(np.percentile(us, 99)), "intra_op_threads": intra,
            "batch64_per_row_us": float(np.median(batch_times)) * 1e6 / 64}
