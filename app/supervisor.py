"""uvicorn's worker supervisor (BNSERVE_WORKERS > 1), with two changes bnserve needs.

- **A dead worker's live gauges are dropped.** Each worker writes its metrics to files in the
  multiprocess directory; a worker killed outright (kill -9, the OOM killer) cannot remove its
  own, and prometheus_client would add its last ``bnserve_requests_in_flight`` (and model info)
  to every scrape for good. When uvicorn replaces a dead worker, its files are marked dead
  (``multiprocess.mark_process_dead``); counters keep what it counted.
- **SIGHUP reloads the model in each worker instead of restarting them.** uvicorn's answer to
  SIGHUP is a rolling restart that counts a worker as ready once its lifespan start-up is done;
  a worker whose new model file is bad also gets there (unready, app/lifecycle.py), so the
  restart would replace every good worker with one that answers 503. bnserve forwards SIGHUP
  to each worker instead, which checks its model file and swaps a good new model in while the
  old one keeps serving (app/reload.py). A worker still starting when the signal comes may die
  of it (its handler is not installed yet); uvicorn restarts it, and it loads the file as it is.

Both lean on uvicorn 0.54's private internals: ``Multiprocess.keep_subprocess_alive`` (replaces
dead workers in ``self.processes``, whose items have ``.pid``) and ``handle_signals``'s dispatch
of SIGHUP to ``handle_hup``. ``make_supervisor`` checks them before the first worker starts and,
if they differ, logs a WARNING and runs uvicorn's own supervisor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from socket import socket
from typing import Any

from uvicorn import Config
from uvicorn.supervisors import multiprocess
from uvicorn.supervisors.multiprocess import Multiprocess

log = logging.getLogger("bnserve.supervisor")

_RELIED_ON = ("keep_subprocess_alive", "handle_signals", "handle_hup")


def missing_internals(supervisor_class: type[Any] = Multiprocess) -> list[str]:
    """What of uvicorn's supervisor this module relies on and cannot find."""
    missing = [f"Multiprocess.{name}()" for name in _RELIED_ON
               if not callable(getattr(supervisor_class, name, None))]
    signals = getattr(multiprocess, "SIGNALS", None)
    if not isinstance(signals, dict) or signals.get(signal.SIGHUP) != "HUP":
        missing.append("uvicorn.supervisors.multiprocess.SIGNALS[SIGHUP]")
    return missing


class Supervisor(Multiprocess):
    def keep_subprocess_alive(self) -> None:
        before = self.worker_pids()
        super().keep_subprocess_alive()
        for pid in before - self.worker_pids():  # replaced: that worker is dead
            _forget_metrics(pid)

    def handle_hup(self) -> None:
        pids = self.worker_pids()
        log.info("SIGHUP received: asking %d worker(s) to check the model file", len(pids))
        for pid in pids:  # one that died just now is skipped: its replacement loads the file
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    def worker_pids(self) -> set[int]:
        processes = getattr(self, "processes", None)
        if not isinstance(processes, list):
            return set()
        return {pid for p in processes if isinstance(pid := getattr(p, "pid", None), int)}


def _forget_metrics(pid: int) -> None:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client import multiprocess as prom  # noqa: PLC0415 - after the env is set

    try:
        prom.mark_process_dead(pid)  # type: ignore[no-untyped-call]
    except OSError as e:
        log.warning("could not remove the metrics files of dead worker %d: %s", pid, e)
        return
    log.info("worker %d died: its in-flight requests and model info left the metrics", pid)


def make_supervisor(config: Config, sockets: list[socket]) -> Multiprocess:
    missing = missing_internals()
    if missing:
        log.warning("uvicorn's supervisor has changed (missing: %s): running it unchanged, so a "
                    "worker that dies leaves its in-flight requests in bnserve_requests_in_flight, "
                    "and SIGHUP restarts the workers (uvicorn's behaviour) instead of reloading "
                    "the model in each; send SIGHUP to each worker's pid instead",
                    ", ".join(missing))
        return Multiprocess(config, sockets=sockets)
    supervisor = Supervisor(config, sockets=sockets)
    if not isinstance(getattr(supervisor, "processes", None), list):
        log.warning("uvicorn's supervisor has no 'processes' list: dead workers' metrics will not "
                    "be cleaned up and SIGHUP reaches no worker")
    return supervisor
