"""Hot reload: a changed model file is loaded beside the served model, then swapped in atomically.

A watcher task in each worker looks at the model file (``stat``, following symbolic links:
device, inode, size, mtime) every ``BNSERVE_RELOAD_SECONDS`` (0: never on its own) and at once on
SIGHUP. When the file changed, the new model is loaded, its interface checked and warmed up
(which verifies each example alone equals the same example inside a batch, bit for bit), all in
a thread, while the old model keeps serving. Only then does ``rt.model`` change, in one attribute
write on the event loop: a request reads ``rt.model`` once, so it finishes on the model it started
with and its answer carries that model's version. A file that fails any check leaves the old
model serving and says why: one ERROR log line, ``bnserve_model_reloads_total{result="failed"}``
and ``last_reload`` in GET /model. The same file is not tried again until it changes (or SIGHUP).

Replace the file atomically (``mv``/``os.replace``, or a symlink swap as Kubernetes does): a file
copied in place may be seen half written, which fails as a bad file until the copy completes.

Loading runs in a daemon thread awaited through a future, not in the default executor: a load
blocked in the kernel (a hung network filesystem blocks even ``stat``) must not keep the process
alive after shutdown, which joins the executor's threads but not daemon threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar

from app.predictor import ModelError, Predictor
from app.state import Fingerprint, Model, ReloadAttempt, Runtime

log = logging.getLogger("bnserve.reload")

T = TypeVar("T")


async def in_daemon_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a new daemon thread; cancelling the caller abandons the thread."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            outcome = partial(_settle, future, fn())
        except BaseException as e:  # handed to the caller, whatever it is
            outcome = partial(_settle_error, future, e)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(outcome)

    name = getattr(getattr(fn, "func", fn), "__name__", "call")  # a partial's function
    threading.Thread(target=target, name=f"bnserve-{name}", daemon=True).start()
    return await future


def _settle(future: asyncio.Future[T], result: T) -> None:
    if not future.done():  # else the caller was cancelled meanwhile
        future.set_result(result)


def _settle_error(future: asyncio.Future[T], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


async def fingerprint(rt: Runtime) -> Fingerprint | None:
    return await in_daemon_thread(partial(Fingerprint.of, rt.settings.model_path))


async def load_predictor(rt: Runtime, warming_up: Callable[[], None] | None = None) -> Predictor:
    """Load and check the configured file, then warm it up; ModelError if it cannot serve."""
    s = rt.settings
    intra, inter = s.threads()
    predictor = await in_daemon_thread(
        partial(Predictor.load, s.model_path, intra, inter, s.max_model_bytes))
    if warming_up is not None:
        warming_up()
    await in_daemon_thread(partial(predictor.warm_up, s.max_batch))
    return predictor


def publish(rt: Runtime, predictor: Predictor) -> None:
    """Make ``predictor`` the served model: metrics first, then one attribute write."""
    rt.metrics.set_model(predictor.info)
    rt.model = Model.of(predictor, rt.settings.max_batch)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Watcher:
    """Checks the model file every ``reload_seconds`` and whenever ``check_soon`` is called."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.interval = rt.settings.reload_seconds or None  # None: only when asked (SIGHUP)
        self._wake = asyncio.Event()
        self._failed = False  # the last attempt, for the file as it is now, failed

    def check_soon(self) -> None:
        """Ask for a check now (on the event loop: SIGHUP's handler schedules this)."""
        self._wake.set()

    async def run(self) -> None:
        self._failed = self.rt.model is None  # the first load, just attempted, failed
        while True:
            forced = await self._next()
            try:
                await self.check(forced)
            except Exception:  # never let the watcher die: the old model keeps serving
                log.exception("model reload check failed unexpectedly; still serving %s",
                              self._version())

    async def _next(self) -> bool:
        """Wait for the next check; True if it was asked for."""
        try:
            await asyncio.wait_for(self._wake.wait(), self.interval)
        except TimeoutError:
            return False
        self._wake.clear()
        return True

    async def check(self, forced: bool = False) -> None:
        """Reload if the file changed since the last attempt (or, when forced, if that failed)."""
        seen = await fingerprint(self.rt)
        if seen == self.rt.model_file and not (forced and self._failed):
            if forced:
                log.info("model file unchanged since it was loaded: nothing to reload")
            return
        await self.reload(seen)

    async def reload(self, seen: Fingerprint | None) -> None:
        rt = self.rt
        old = rt.model
        rt.model_file = seen  # before reading: a change from here on triggers another look
        try:
            predictor = await load_predictor(rt)
        except ModelError as e:
            self._fail(str(e))
            return
        except Exception as e:  # not a refusal we know: say so, with the traceback
            self._fail(f"unexpected {type(e).__name__}: {e}", exc_info=True)
            return
        info = predictor.info
        if old is not None and info.sha256 == old.predictor.info.sha256:
            self._failed = False
            log.info("model file touched or replaced by the same bytes (sha256 %s): still "
                     "serving %s", info.sha256[:12], old.version)
            return
        publish(rt, predictor)
        if old is None:  # the first load had failed: this is the first model served
            rt.readiness.set_ready()
        self._failed = False
        reason = f"{old.version if old else 'no model'} -> {info.model_version}"
        rt.last_reload = ReloadAttempt(_now(), "ok", reason, info.model_version)
        rt.metrics.count_reload(ok=True)
        log.info("model reloaded: %s", reason, extra={"fields": {
            "model_version": info.model_version, "previous_version": old.version if old else None,
            "sha256": info.sha256, "load_ms": round(info.load_seconds * 1000, 1),
            "warm_up_ms": round(info.warm_up_seconds * 1000, 1),
        }})

    def _fail(self, reason: str, exc_info: bool = False) -> None:
        self._failed = True
        model = self.rt.model
        version = None if model is None else model.version
        self.rt.last_reload = ReloadAttempt(_now(), "failed", reason, version)
        self.rt.metrics.count_reload(ok=False)
        log.error("model reload failed: %s; still serving %s", reason, self._version(),
                  exc_info=exc_info)

    def _version(self) -> str:
        model = self.rt.model
        return f"model version {model.version}" if model else "no model (not ready)"
