"""Logs: JSON lines (one object per line, for log pipelines) or plain text, all on stdout.

``BNSERVE_LOG_FORMAT=auto`` (the default) picks text when stdout is a terminal and JSON lines
otherwise (a pipe, a file, a container's log driver); ``json`` or ``text`` force one.

Structured fields travel in ``extra={"fields": {...}}`` and become top-level JSON keys (or
``key=value`` pairs in text). The same formatter handles uvicorn's own loggers, so every line the
service prints has one format.

The per-request access line is the exception to "through the logging module": a LogRecord, the
caller lookup, the handler lock and one write syscall per line cost about a quarter of a
/predict request's CPU time. ``AccessLog`` formats the same line directly and writes all the lines
of one event-loop iteration with one write, right after that iteration.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import os
import sys
import time
from typing import Any, Literal, TextIO

import orjson

ACCESS_LOGGER = "bnserve.access"
APP_LOGGER = "bnserve"
_MAX_CACHED = 256  # (method, path, status) combinations whose JSON the access log keeps


def resolve_format(fmt: str, stream: TextIO | None = None) -> Literal["json", "text"]:
    """``auto`` -> ``text`` if ``stream`` (default: sys.stdout) is a terminal, else ``json``."""
    if fmt in ("json", "text"):
        return "json" if fmt == "json" else "text"
    if fmt != "auto":
        raise ValueError(f"log format {fmt!r}: expected auto, json or text")
    try:
        tty = (stream or sys.stdout).isatty()
    except (AttributeError, ValueError, OSError):  # no stdout, or a closed one
        tty = False
    return "text" if tty else "json"


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
        f".{int(record.msecs):03d}Z"
    )


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "pid", "msg", ...fields, "exc"?}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger> <msg> key=value ...`` and the traceback, if any, below."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class AccessLog:
    """One line per request: request id, method, path, status, latency (ms)."""

    def __init__(self, level: str, fmt: str, stream: TextIO | None = None) -> None:
        self.enabled = logging.getLevelName(level.upper()) <= logging.INFO
        self.json = resolve_format(fmt, stream) == "json"
        self._stream = stream  # None: whatever sys.stdout is when the lines are written
        self._pid = os.getpid()
        self._pending: list[str] = []
        self._second = -1
        self._prefix = ""
        self._middles: dict[tuple[str, str, int], tuple[str, str]] = {}

    def log(self, request_id: str, method: str, path: str, status: int, seconds: float) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:  # strftime once per second, not once per line
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        ts = f"{self._prefix}.{int((now - second) * 1000):03d}Z"
        ms = round(seconds * 1000, 3)
        if self.json:
            # The same object orjson would write for the dict, from a cached middle part: the
            # request id is visible ASCII (checked in app/service.py) and needs escaping only
            # for '"' and '\\'.
            middle = self._middles.get((method, path, status))
            if middle is None:
                middle = self._middle(method, path, status)
            rid = orjson.dumps(request_id).decode() if (
                '"' in request_id or "\\" in request_id) else f'"{request_id}"'
            line = (f'{{"ts":"{ts}","level":"info","logger":"{ACCESS_LOGGER}",'
                    f'"pid":{self._pid},{middle[0]},"request_id":{rid},{middle[1]},'
                    f'"latency_ms":{ms!r}}}')
        else:
            if not path.isprintable():  # ASGI paths are percent-decoded: keep one line per request
                path = orjson.dumps(path).decode()
            line = (f"{ts} INFO    {ACCESS_LOGGER} {method} {path} {status} "
                    f"request_id={request_id} latency_ms={ms}")
        self._pending.append(line)
        if len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop in this thread
                self.flush()

    def _middle(self, method: str, path: str, status: int) -> tuple[str, str]:
        """The JSON members that depend only on method, path and status (cached for routes)."""
        msg = orjson.dumps({"msg": f"{method} {path} {status}"}).decode()[1:-1]
        rest = orjson.dumps({"method": method, "path": path, "status": status}).decode()[1:-1]
        if len(self._middles) < _MAX_CACHED:  # raw paths are unbounded: cache a few only
            self._middles[(method, path, status)] = (msg, rest)
        return msg, rest

    def flush(self) -> None:
        if not self._pending:
            return
        text = "\n".join(self._pending) + "\n"
        self._pending.clear()
        stream = self._stream or sys.stdout
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # stdout closed or gone: losing log lines beats failing
            pass


def config_dict(level: str, fmt: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict; also given to uvicorn, which applies it in every
    worker process (``auto`` is resolved here, against this process's stdout, which the workers
    share)."""
    formatter = JsonFormatter if resolve_format(fmt) == "json" else TextFormatter
    lvl = level.upper()
    handler = {"handlers": ["default"], "level": lvl, "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stdout",
            }
        },
        "loggers": {
            APP_LOGGER: handler,
            "uvicorn": handler,
            "uvicorn.error": {"level": lvl},
            # uvicorn's access lines are replaced by ours (with request ids): never printed
            "uvicorn.access": {"handlers": [], "level": lvl, "propagate": False},
        },
    }


def configure(level: str, fmt: str) -> None:
    logging.config.dictConfig(config_dict(level, fmt))
