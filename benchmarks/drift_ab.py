"""What drift monitoring costs (issue 13: at most 5 % of /predict's req/s at c=16), measured two
ways in the same run.

End to end, an A/B: two bnserve servers with monitoring on (the default) and two with it off,
all serving the same /predict requests at c=16, measured back to back in every round, in the
order on1 off1 on2 off2 and reversed every other round, so that slow drift of the machine (load
from neighbours, heat) falls on both sides alike. Every round starts four fresh processes: a
process keeps its own speed for its whole life (two identical servers in one run of
``make bench`` can differ by 5 % or more, round after round: see the noise control), and a
fixed pair would carry its luck into every round. Drawn anew each round, that luck is noise
the median over rounds averages out. A round's ratio is mean(on req/s) / mean(off req/s).

In-process, without HTTP: what a watched ONNX Runtime run (the monitoring outputs too, then
buffered by the monitor) costs over a plain one, and so per request at the sampling rate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.drift import DriftMonitor
from app.predictor import Predictor
from app.settings import Settings

ServerFactory = Callable[[str, bool], Any]  # (name, drift on?) -> a benchmarks Server
MeasureCell = Callable[[Any], dict[str, float]]  # a Server -> one c=16 cell on /predict


def ab(make: ServerFactory, measure: MeasureCell, rounds: int) -> dict[str, Any]:
    """The A/B above: per round each fresh server's cell, and the on/off ratio."""
    names = ["on1", "off1", "on2", "off2"]
    cells: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    ratios: list[float] = []
    for r in range(rounds):
        servers = [make(f"drift-{n}", n.startswith("on")) for n in names]
        try:
            for s in servers:
                s.start()
            order = list(zip(names, servers, strict=True))
            for name, server in order if r % 2 == 0 else order[::-1]:
                cells[name].append(measure(server))
        finally:
            for s in servers:
                s.stop()
        on = (cells["on1"][-1]["rps"] + cells["on2"][-1]["rps"]) / 2
        off = (cells["off1"][-1]["rps"] + cells["off2"][-1]["rps"]) / 2
        ratios.append(on / off)
        print(f"drift A/B round {r + 1}/{rounds}: on {on:.0f} req/s, off {off:.0f} req/s, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    return {"rounds": rounds, "fresh_processes_per_round": True, "cells": cells,
            "ratios": ratios, "ratio": statistics.median(ratios),
            "cpu_us": {n: statistics.median(c["cpu_us"] for c in cells[n]) for n in names},
            "errors": sum(int(c["errors"]) for n in names for c in cells[n])}


def inprocess(model: Path, x: np.ndarray[Any, Any], sample_every: int | None = None,
              repeats: int = 7, n: int = 5000) -> dict[str, float]:
    """Best-of-``repeats`` us per call of a plain run and of a watched run with the monitor's
    buffering, alternated, over the rows of ``x`` one at a time; per request when every
    ``sample_every``-th run is watched (default: the service's setting)."""
    s = Settings()
    every = sample_every or s.drift_sample_every
    predictor = Predictor.load(model, *Settings(workers=1).threads())
    reference = predictor.info.drift
    if reference is None:
        raise SystemExit(f"{model} carries no drift reference: export it again")
    monitor = DriftMonitor(reference, time_constant=s.drift_time_constant)
    rows = [x[i : i + 1].astype(np.float32) for i in range(len(x))]

    def plain() -> None:
        for i in range(n):
            predictor.predict(rows[i % len(rows)])

    def watched() -> None:
        for i in range(n):
            monitor.observe_watched(predictor.run_watched(rows[i % len(rows)])[1])

    best = {"plain": float("inf"), "watched": float("inf")}
    for _ in range(repeats):
        for name, f in (("plain", plain), ("watched", watched)):
            t0 = time.perf_counter()
            f()
            best[name] = min(best[name], (time.perf_counter() - t0) / n * 1e6)
    extra = best["watched"] - best["plain"]
    return {"run_us": best["plain"], "watched_run_us": best["watched"],
            "extra_per_watched_run_us": extra, "sample_every": every,
            "extra_per_request_us": extra / every}
