"""bnserve-serve: run the service with uvicorn (uvloop event loop, httptools HTTP parser).

Settings come from BNSERVE_* environment variables (listed below); the few flags override
them. Exit status: 0 after a clean shutdown (SIGTERM or Ctrl-C), 2 for invalid settings or
(with BNSERVE_FAIL_FAST=true) an unusable model, 3 if the server could not start.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

from app import logs
from app.settings import Settings

log = logging.getLogger("bnserve.cli")

APP_FACTORY = "app.main:create_app_from_env"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is imported
STARTUP_FAILURE = 3  # uvicorn's exit status for a server that could not start
_FLAGS = ("model_path", "model_name", "host", "port", "workers", "log_level", "log_format")


def _parser() -> argparse.ArgumentParser:
    env = "\n".join(
        f"  BNSERVE_{name.upper():<26} {field.description} "
        f"(default: {'unset' if field.default is None else field.default})"
        for name, field in Settings.model_fields.items()
    )
    p = argparse.ArgumentParser(
        prog="bnserve-serve", description=__doc__,
        epilog="environment variables:\n" + env,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-path", help="ONNX file to serve (BNSERVE_MODEL_PATH)")
    p.add_argument("--model-name", help="the model's name in /v2/models/<name> "
                   "(BNSERVE_MODEL_NAME; default: the file's stem)")
    p.add_argument("--host", help="interface to listen on (BNSERVE_HOST)")
    p.add_argument("--port", type=int, help="port to listen on (BNSERVE_PORT)")
    p.add_argument("--workers", type=int, help="worker processes (BNSERVE_WORKERS)")
    p.add_argument("--log-level", help="BNSERVE_LOG_LEVEL")
    p.add_argument("--log-format", choices=["auto", "json", "text"], help="BNSERVE_LOG_FORMAT")
    return p


def _prepare_metrics_dir(settings: Settings) -> Path | None:
    """Point prometheus_client at a clean multiprocess directory (before any worker imports it).

    Returns the directory if this process created it (and so must remove it at exit).
    """
    if settings.metrics_dir is None and settings.workers == 1:
        os.environ.pop(MULTIPROC_ENV, None)  # the setting decides, not a stale variable
        return None
    created = None
    if settings.metrics_dir is None:
        created = Path(tempfile.mkdtemp(prefix="bnserve-metrics-"))
        path = created
    else:
        path = settings.metrics_dir
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # files of a previous run would be summed in
            stale.unlink()
    os.environ[MULTIPROC_ENV] = str(path)
    os.environ["BNSERVE_METRICS_DIR"] = str(path)
    return created


def _check_model(settings: Settings) -> int | None:
    """fail_fast's check before serving: None if the model is good, else the exit status (2 for
    a bad model, 0 if SIGTERM or Ctrl-C came while the load was still running). The load runs in
    a daemon thread, so a load that hangs (a dead network filesystem) cannot keep us alive."""
    from app.predictor import ModelError, Predictor  # noqa: PLC0415 - only needed here

    outcome: list[BaseException | None] = []
    done = threading.Event()

    def check() -> None:
        try:
            Predictor.load(settings.model_path, 1, 1, settings.max_model_bytes).warm_up(
                settings.max_batch)
            outcome.append(None)
        except BaseException as e:  # reported below, in the main thread
            outcome.append(e)
        done.set()

    stopped: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stopped.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        threading.Thread(target=check, name="bnserve-check-model", daemon=True).start()
        while not done.wait(0.1) and not stopped:
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not done.is_set():
        log.info("%s received while checking the model; exiting", signal.Signals(stopped[0]).name)
        return 0
    error = outcome[0]
    if isinstance(error, ModelError):
        log.error("model not loaded: %s; exiting (fail_fast)", error)
        return 2
    if error is not None:
        raise error
    return None


def _serve(settings: Settings) -> int:
    import uvicorn  # noqa: PLC0415 - after the environment is prepared

    from app.protocol import PROTOCOL  # noqa: PLC0415
    from app.supervisor import make_supervisor  # noqa: PLC0415

    config = uvicorn.Config(
        APP_FACTORY, factory=True, host=settings.host, port=settings.port,
        workers=settings.workers, loop="uvloop", http=PROTOCOL, lifespan="on",
        log_config=logs.config_dict(settings.log_level, settings.log_format),
        log_level=settings.log_level, access_log=False, server_header=False,
        proxy_headers=False,  # nothing here uses the client address: skip X-Forwarded-* parsing
        timeout_keep_alive=settings.keep_alive_seconds,
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
    )
    # Bound before anything else runs: a port already in use then ends the start with one clear
    # line and status 1, before the lifespan starts loading the model in a thread (exiting with
    # that load under way could abort the process from inside ONNX Runtime).
    try:
        sock = config.bind_socket()
    except SystemExit:  # uvicorn has logged the OSError
        log.error("cannot listen on %s:%d (is another bnserve-serve running? choose another "
                  "port with BNSERVE_PORT or --port); exiting", settings.host, settings.port)
        return STARTUP_FAILURE
    if settings.workers > 1:
        # Each worker gets SIGTERM from the supervisor and runs the same lifespan, which makes
        # its readiness 503 and drains it (app/lifecycle.py). SIGHUP: app/supervisor.py.
        supervisor = make_supervisor(config, [sock])
        supervisor.run()
        failed = any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
        return STARTUP_FAILURE if failed else 0

    server = uvicorn.Server(config)

    def stop(signum: int, frame: FrameType | None) -> None:
        # Active before uvicorn installs its handlers, and again after it restores them: it
        # re-raises the signal after a graceful shutdown, which with the default disposition
        # would turn a clean drain into death by SIGTERM. Here it just ends the run (exit 0).
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the lifespan handles it (a reload)
    try:
        server.run(sockets=[sock])
    except SystemExit as e:  # uvicorn exits like this when the lifespan start-up fails
        return e.code if isinstance(e.code, int) else STARTUP_FAILURE
    return 0 if server.started else STARTUP_FAILURE


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in _FLAGS:  # through the environment, so worker processes see them too
        value = getattr(args, name)
        if value is not None:
            os.environ[f"BNSERVE_{name.upper()}"] = str(value)
    try:
        settings = Settings()
    except ValidationError as e:
        print(f"bnserve-serve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    budget = settings.cpu_budget()
    intra, inter = settings.threads(budget)
    log.info(
        "starting bnserve: %d worker(s), onnxruntime %d intra-op / %d inter-op thread(s) each; "
        "CPU budget %s", settings.workers, intra, inter, budget.describe(),
        extra={"fields": {
            "model_path": str(settings.model_path), "host": settings.host, "port": settings.port,
            "workers": settings.workers, "cpu_budget": budget.cpus,
            "intra_op_threads": intra, "inter_op_threads": inter,
            "threads_from": "settings" if settings.intra_op_threads else "cpu budget",
            "max_body_bytes": settings.max_body_bytes, "max_batch": settings.max_batch,
            "fail_fast": settings.fail_fast, "batching": settings.batching,
            "batch_max_size": settings.batch_max_size,
            "batch_max_wait_ms": settings.batch_max_wait_ms,
        }},
    )
    if settings.workers > budget.cpus:
        log.warning("%d workers on a budget of %d CPU(s): they will compete for CPUs; use at most "
                    "%d", settings.workers, budget.cpus, budget.cpus)
    created = _prepare_metrics_dir(settings)
    try:
        if settings.fail_fast and (status := _check_model(settings)) is not None:
            return status
        return _serve(settings)
    finally:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
