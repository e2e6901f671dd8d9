"""Start-up (load, check, warm up the model) and shutdown (readiness off the moment SIGTERM lands).

Loading runs in a thread, in the background: the server starts listening at once, so /livez
answers while the model loads and /readyz says why it is not ready yet. With ``fail_fast`` the
load is awaited instead and a bad model aborts the start-up (uvicorn then exits non-zero).

SIGTERM: uvicorn installs its own handler and only starts draining on its next 100 ms tick. We
wrap that handler so readiness turns 503 the instant the signal arrives, then let uvicorn carry
on (after ``shutdown_delay_seconds``, during which requests are still served so a load balancer
can take this instance out of rotation first). The wrapper is installed from the lifespan, which
runs inside every worker process, so it works the same with one worker or several.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from app.predictor import ModelError, Predictor
from app.state import Model, Runtime

log = logging.getLogger("bnserve.lifecycle")

Handler = Callable[[int, FrameType | None], Any]


async def load_model(rt: Runtime) -> None:
    """Load, check and warm up; publish the model and become ready. Raises ModelError."""
    s, readiness = rt.settings, rt.readiness
    intra, inter = s.threads()
    readiness.not_ready(f"loading model {str(s.model_path)!r}")
    try:
        predictor = await asyncio.to_thread(Predictor.load, s.model_path, intra, inter)
        readiness.not_ready("warming up")
        await asyncio.to_thread(predictor.warm_up, s.max_batch)
    except ModelError as e:
        readiness.not_ready(f"model not loaded: {e}")
        raise
    info = predictor.info
    features = None if info.feature_names is None else len(info.feature_names)
    rt.metrics.set_model(info)
    rt.model = Model.of(predictor, s.max_batch)
    readiness.set_ready()
    log.info("model ready", extra={"fields": {
        "model_version": info.model_version, "path": info.path, "sha256": info.sha256,
        "output_kind": info.output_kind, "input_shape": list(info.input_shape),
        "features": features, "classes": info.class_names,
        "load_ms": round(info.load_seconds * 1000, 1),
        "warm_up_ms": round(info.warm_up_seconds * 1000, 1),
        "intra_op_threads": intra, "inter_op_threads": inter,
    }})


async def _load_in_background(rt: Runtime) -> None:
    try:
        await load_model(rt)
    except ModelError as e:
        log.error("model not loaded: %s; the service stays unready (/readyz 503) until it is "
                  "restarted with a valid model (BNSERVE_FAIL_FAST=true exits instead)", e)
    except Exception as e:
        rt.readiness.not_ready(f"model not loaded: unexpected {type(e).__name__}: {e}")
        log.exception("model not loaded: unexpected error; the service stays unready")


def install_signal_hooks(rt: Runtime, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Wrap the server's SIGTERM/SIGINT handlers; returns a function that unwraps them."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # e.g. TestClient: no signals to hook, and none needed
    delay = rt.settings.shutdown_delay_seconds
    previous: dict[int, Handler] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        first = not rt.readiness.shutting_down
        rt.readiness.begin_shutdown()  # from this instant /readyz answers 503
        server_handler = previous[signum]
        if first:
            loop.call_soon_threadsafe(_log_shutdown, signum, delay)
        if first and signum == signal.SIGTERM and delay > 0:
            loop.call_soon_threadsafe(loop.call_later, delay, server_handler, signum, None)
        else:  # SIGINT (Ctrl-C) or a second signal: no delay
            server_handler(signum, frame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(sig)
        if callable(current):  # a server handles it; otherwise leave the default alone
            previous[sig] = current
            signal.signal(sig, on_signal)

    def restore() -> None:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is on_signal:
                signal.signal(sig, handler)

    return restore


def _log_shutdown(signum: int, delay: float) -> None:
    name = signal.Signals(signum).name
    then = f"serving {delay:g} s more, then draining" if delay and name == "SIGTERM" else "draining"
    log.info("%s received: readiness is now 503; %s in-flight requests", name, then)


def lifespan(rt: Runtime) -> Callable[[Any], Any]:
    @asynccontextmanager
    async def run(_app: Any) -> AsyncIterator[None]:
        restore = install_signal_hooks(rt, asyncio.get_running_loop())
        task: asyncio.Task[None] | None = None
        try:
            if rt.settings.fail_fast:
                try:
                    await load_model(rt)
                except ModelError as e:
                    log.error("model not loaded: %s; exiting (fail_fast)", e)
                    raise RuntimeError(f"model not loaded: {e}") from None
            else:
                task = asyncio.create_task(_load_in_background(rt))
            yield
        finally:
            rt.readiness.begin_shutdown()
            if task is not None and not task.done():
                task.cancel()
            restore()
            rt.metrics.close()
            rt.access_log.flush()

    return run
