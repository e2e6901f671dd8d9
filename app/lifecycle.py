"""Start-up (load, check, warm up the model) and shutdown (readiness off the moment SIGTERM lands).

With one worker, loading runs in the background: the server starts listening at once, so /livez
answers while the model loads and /readyz says why it is not ready yet. With several workers the
lifespan awaits the load instead: uvicorn only starts serving on the shared socket once the
lifespan start-up is done, so a worker (also one uvicorn restarts after a crash) takes no
connection before its model is warm, and the other workers keep serving meanwhile. A worker whose
load fails still starts and stays unready (503 with the reason). With ``fail_fast`` the load is
awaited too and a bad model aborts the start-up (uvicorn then exits non-zero). An awaited load
gives up when shutdown begins (SIGTERM while a load hangs on a dead network filesystem).

Loads run in daemon threads (app/reload.py), so a load blocked in the kernel never keeps the
process from exiting. After the first load, a watcher (app/reload.py) reloads a changed model
file every ``reload_seconds`` and on SIGHUP.

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

from app.predictor import ModelError
from app.reload import Watcher, fingerprint, load_predictor, publish
from app.state import Runtime

log = logging.getLogger("bnserve.lifecycle")

Handler = Callable[[int, FrameType | None], Any]
_SHUTDOWN_POLL_SECONDS = 0.1


async def load_model(rt: Runtime) -> None:
    """Load, check and warm up; publish the model and become ready. Raises ModelError."""
    s, readiness = rt.settings, rt.readiness
    intra, inter = s.threads()
    readiness.not_ready(f"loading model {str(s.model_path)!r}")
    rt.model_file = await fingerprint(rt)
    try:
        predictor = await load_predictor(rt, lambda: readiness.not_ready("warming up"))
    except ModelError as e:
        readiness.not_ready(f"model not loaded: {e}")
        raise
    info = predictor.info
    features = None if info.feature_names is None else len(info.feature_names)
    publish(rt, predictor)
    readiness.set_ready()
    log.info("model ready", extra={"fields": {
        "model_version": info.model_version, "path": info.path, "sha256": info.sha256,
        "output_kind": info.output_kind, "input_shape": list(info.input_shape),
        "features": features, "classes": info.class_names,
        "load_ms": round(info.load_seconds * 1000, 1),
        "warm_up_ms": round(info.warm_up_seconds * 1000, 1),
        "intra_op_threads": intra, "inter_op_threads": inter,
    }})


async def _load_or_stay_unready(rt: Runtime) -> None:
    try:
        await load_model(rt)
    except ModelError as e:
        log.error("model not loaded: %s; the service stays unready (/readyz 503) until a valid "
                  "file is in place and reloaded (SIGHUP, or BNSERVE_RELOAD_SECONDS) or it is "
                  "restarted (BNSERVE_FAIL_FAST=true exits instead)", e)
    except Exception as e:
        rt.readiness.not_ready(f"model not loaded: unexpected {type(e).__name__}: {e}")
        log.exception("model not loaded: unexpected error; the service stays unready")


async def _load_then_watch(rt: Runtime, watcher: Watcher) -> None:
    await _load_or_stay_unready(rt)
    await watcher.run()


async def _load_fail_fast(rt: Runtime) -> None:
    try:
        await load_model(rt)
    except ModelError as e:
        log.error("model not loaded: %s; exiting (fail_fast)", e)
        raise RuntimeError(f"model not loaded: {e}") from None


async def _until_loaded_or_shutdown(rt: Runtime, fail_fast: bool) -> None:
    """Await the first load, unless shutdown begins first: a load can hang for good (a dead
    network filesystem), and uvicorn cannot shut down before the lifespan start-up returns."""
    load = asyncio.create_task(_load_fail_fast(rt) if fail_fast else _load_or_stay_unready(rt))
    try:
        while not load.done():
            await asyncio.wait({load}, timeout=_SHUTDOWN_POLL_SECONDS)
            if rt.readiness.shutting_down and not load.done():
                log.warning("shutdown began while the model was still loading; not waiting "
                            "for it")
                return
    finally:
        load.cancel()  # no-op once it is done
    load.result()  # fail_fast: the RuntimeError that aborts the start-up


def install_signal_hooks(
    rt: Runtime, loop: asyncio.AbstractEventLoop, on_reload: Callable[[], None] | None = None,
) -> Callable[[], None]:
    """Wrap the server's SIGTERM/SIGINT handlers and handle SIGHUP (``on_reload``, called on the
    event loop); returns a function that puts the previous handlers back."""
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

    hup_before: Any = None
    if on_reload is not None:
        def on_hup(signum: int, frame: FrameType | None) -> None:
            loop.call_soon_threadsafe(_reload_asked, on_reload)

        hup_before = signal.signal(signal.SIGHUP, on_hup)

    def restore() -> None:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is on_signal:
                signal.signal(sig, handler)
        if on_reload is not None:  # a late SIGHUP must not kill a process that is draining
            signal.signal(signal.SIGHUP, hup_before if callable(hup_before) else signal.SIG_IGN)

    return restore


def _reload_asked(on_reload: Callable[[], None]) -> None:
    log.info("SIGHUP received: checking the model file")
    on_reload()


def _log_shutdown(signum: int, delay: float) -> None:
    name = signal.Signals(signum).name
    then = f"serving {delay:g} s more, then draining" if delay and name == "SIGTERM" else "draining"
    log.info("%s received: readiness is now 503; %s in-flight requests", name, then)


def lifespan(rt: Runtime) -> Callable[[Any], Any]:
    @asynccontextmanager
    async def run(_app: Any) -> AsyncIterator[None]:
        watcher = Watcher(rt)
        restore = install_signal_hooks(rt, asyncio.get_running_loop(), watcher.check_soon)
        s = rt.settings
        task: asyncio.Task[None] | None = None
        try:
            if s.fail_fast or s.workers > 1:  # not serving before the model is warm
                await _until_loaded_or_shutdown(rt, s.fail_fast)
                task = asyncio.create_task(watcher.run())
            else:  # listening at once: /livez answers during the load
                task = asyncio.create_task(_load_then_watch(rt, watcher))
            yield
        finally:
            rt.readiness.begin_shutdown()
            if task is not None and not task.done():
                task.cancel()  # a load or reload still running is abandoned with its thread
            restore()
            rt.metrics.close()
            rt.access_log.flush()

    return run
