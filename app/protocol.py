"""The HTTP protocol bnserve runs under uvicorn: httptools, answers written together, and limits
per connection that stock uvicorn does not have.

**Answers written together.** uvicorn's httptools protocol writes each answer to its socket at
once: the status line and headers in one send, the body in another. Under load that is the
expensive part of a small answer: each send on a socket whose reader sleeps wakes that reader
(on a VM, a cross-CPU interrupt), and measured at 16 connections it cost 22 us of kernel time per
request, more than the whole prediction. So while other requests are in flight, a connection's
writes are held until the end of the event-loop iteration and then written with one send per
connection, after every request that was ready in the iteration has been answered (the idea of
Netty's FlushConsolidationHandler). The client reads all of them in one wake-up. A request that
is alone in flight is written at once, as before, so at concurrency 1 it costs nothing and never
waits a loop turn. Bytes and their order on each connection are unchanged; held bytes are
written even if the connection is closing (the client half-closed, or we close after them) and
dropped only once it is really gone (``connection_lost``), which is logged.

**Limits per connection** (settings in app/settings.py; the defaults hold one connection's
memory to a few MiB whatever it sends):

- *Pipelining*: a client may send requests without reading the answers. Once
  ``max_pipelined_requests`` are queued, the rest of what was read stays unparsed and reading
  pauses until answers are written (uvicorn itself resumes reading on every ``receive()``, so it
  queued every request a flooding client sent). Data is parsed in slices of ``_SLICE`` bytes
  when a read brings more, so one read of up to 256 KB cannot queue thousands at once.
- *Request head*: a request line plus headers over ``max_header_bytes``, or more than
  ``max_headers`` header fields, is answered 431 and the connection closed. The parser is fed
  incrementally, so bytes are counted across reads while a head is incomplete (a head is refused
  at most one slice past the limit, before it is complete), and a complete head is measured
  exactly when it did not arrive in one small piece.
- *Timeouts*: a connection must send a complete head within ``header_timeout_seconds`` of opening
  (or of its first byte after an answer; idle time between requests is uvicorn's keep-alive),
  and a body within ``body_timeout_seconds`` of its head; otherwise it is closed (a body timeout
  is answered 408 first if nothing was sent for that request yet), logged once. One timer per
  event loop checks every connection eight times per timeout (``_Watchman``); nothing is
  armed per request, so a connection is closed between the timeout and about 1.25 times it.
- *Half-close*: a client that shuts down its sending side after its requests (HTTP/1.0 tools,
  some proxies) gets every answer, then the connection is closed; uvicorn closed it at once.
- *Refusals*: when an answer refuses a body it did not read (a 413 on Content-Length, 401, 415,
  501: app/service.py marks them ``Connection: close``) or a head (431), the connection is
  closed gracefully: the answer, then FIN, and whatever the client still sends is read and
  dropped for up to ``_LINGER_SECONDS``; an immediate close with unread input would send RST,
  which can destroy the answer before the client reads it.

**Where the limits come from.** The ``Settings`` of the app being served: uvicorn's factory builds
bnserve's ``Service`` from ``Settings()`` (app/main.py) and the protocol reads
``config.loaded_app.settings``, so both always agree. Serving any other ASGI app (the benchmarks'
bare servers), it reads ``Settings()`` from the ``BNSERVE_*`` environment once per process.

**uvicorn internals.** This leans on private parts of uvicorn's ``HttpToolsProtocol`` (its parser,
request queue ``pipeline``, current ``cycle``, ``flow`` control, keep-alive timer and the running
``tasks``), of ``RequestResponseCycle`` and of ``FlowControl``. At import, ``_missing_internals``
checks that each is still there; if any is not, ``Protocol`` is uvicorn's own protocol, unchanged,
and a WARNING says which and what is off (pyproject.toml pins uvicorn below 0.55).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app.errors import REQUEST_ID_KEY, TIMED_OUT_KEY, error_body
from app.settings import Settings

# ``uvicorn.Config(http=...)`` takes this import string; so does ``uvicorn --http``.
PROTOCOL = "app.protocol:Protocol"

_SLICE = 4096  # bytes parsed at a time from a larger read: bounds requests queued by one read
_LINGER_SECONDS = 2.0  # after a refusal, how long what the client still sends is read and dropped

log = logging.getLogger("bnserve.protocol")


# ---------------------------------------------------------------- limits


@dataclass(frozen=True, slots=True)
class Limits:
    max_pipelined: int
    max_header_bytes: int
    max_headers: int
    header_timeout: float
    body_timeout: float

    @classmethod
    def of(cls, s: Settings) -> Limits:
        return cls(s.max_pipelined_requests, s.max_header_bytes, s.max_headers,
                   s.header_timeout_seconds, s.body_timeout_seconds)

    @property
    def tick(self) -> float:
        """How often the timeouts are checked: an eighth of the shorter one, within [50 ms, 1 s]."""
        return min(max(min(self.header_timeout, self.body_timeout) / 8, 0.05), 1.0)


@functools.cache
def _settings_from_env() -> Settings:
    return Settings()


_LIMITS: weakref.WeakKeyDictionary[Config, Limits] = weakref.WeakKeyDictionary()


def limits_for(config: Config) -> Limits:
    """The limits of the app uvicorn serves (its ``settings``), else from the environment."""
    found = _LIMITS.get(config)
    if found is None:
        settings = getattr(config.loaded_app, "settings", None)
        if not isinstance(settings, Settings):
            settings = _settings_from_env()
        found = _LIMITS[config] = Limits.of(settings)
    return found


# ---------------------------------------------------------------- held writes


class _Flusher:
    """The connections of one event loop that hold bytes; one loop callback writes them all."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._holding: list[_HeldWrites] = []
        self.flushes = 0  # loop callbacks run (tests read it)

    def add(self, conn: _HeldWrites) -> None:
        if not self._holding:
            self._loop.call_soon(self.flush)
        self._holding.append(conn)

    def flush(self) -> None:
        self.flushes += 1
        holding, self._holding = self._holding, []
        for conn in holding:
            conn.flush()


_FLUSHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flusher] = (
    weakref.WeakKeyDictionary()
)


def flusher(loop: asyncio.AbstractEventLoop) -> _Flusher:
    found = _FLUSHERS.get(loop)
    if found is None:
        found = _FLUSHERS[loop] = _Flusher(loop)
    return found


class _HeldWrites:
    """Stands in for a connection's transport towards uvicorn: writes may be held; the rest of
    the transport's interface passes through. ``on_close`` lets the protocol take over a close
    uvicorn asks for (to close gracefully after a refusal)."""

    __slots__ = ("_flusher", "_held", "_in_flight", "closing", "lost", "on_close", "transport")

    def __init__(self, transport: asyncio.Transport, in_flight: set[Any],
                 flusher: _Flusher) -> None:
        self.transport = transport
        self._in_flight = in_flight  # the server's running request tasks, all connections
        self._flusher = flusher
        self._held: list[bytes] = []
        self.closing = False  # the protocol is closing it gracefully (uvicorn must see it closing)
        self.lost = False  # connection_lost: nothing can be written any more
        self.on_close: Any = None  # () -> bool: True if the protocol closes it itself

    def write(self, data: bytes) -> None:
        if self._held:  # keep the order: behind what is already held
            self._held.append(data)
        elif len(self._in_flight) > 1:  # others will answer in this iteration too: hold
            self._held.append(data)
            self._flusher.add(self)
        else:
            self.transport.write(data)

    def writelines(self, lines: list[bytes]) -> None:
        self.write(b"".join(lines))

    def flush(self) -> None:
        if not self._held:
            return
        data = b"".join(self._held)
        self._held.clear()
        if not self.lost:  # a closing transport still sends what it is given before it closes
            self.transport.write(data)

    def close(self) -> None:
        if self.on_close is not None and self.on_close():
            return
        self.close_now()

    def close_now(self) -> None:
        self.flush()
        self.transport.close()

    def lose(self) -> int:
        """The connection is gone: drop what is held; how many bytes that was."""
        self.lost = True
        dropped = sum(map(len, self._held))
        self._held.clear()
        return dropped

    def abort(self) -> None:
        self._held.clear()
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.closing or self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


# ---------------------------------------------------------------- timeouts


class _Watchman:
    """The open connections of one event loop; one timer checks their timeouts every tick."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        self._loop = loop
        self._tick = tick
        self._conns: set[_LimitedProtocol] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, conn: _LimitedProtocol) -> None:
        self._conns.add(conn)
        if self._timer is None:
            self._timer = self._loop.call_later(self._tick, self._check)

    def discard(self, conn: _LimitedProtocol) -> None:
        self._conns.discard(conn)

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        try:
            for conn in list(self._conns):  # a check may close a connection
                try:
                    conn.check_timeouts(now)
                except Exception:
                    log.exception("checking a connection's timeouts failed")
                    self._conns.discard(conn)
        finally:
            if self._conns:
                self._timer = self._loop.call_later(self._tick, self._check)


_WATCHMEN: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watchman] = (
    weakref.WeakKeyDictionary()
)


def watchman(loop: asyncio.AbstractEventLoop, limits: Limits) -> _Watchman:
    found = _WATCHMEN.get(loop)
    if found is None:
        found = _WATCHMEN[loop] = _Watchman(loop, limits.tick)
    return found


_HEAD, _BODY = "head", "body"  # what a connection is waiting for from its client


# ---------------------------------------------------------------- the protocol


class _ReadGate(FlowControl):
    """uvicorn's flow control plus ``held``: while set, reading stays paused whatever uvicorn
    asks. uvicorn asks to resume on every ``receive()`` and after every answer, so while held
    that call is also the protocol's cue (``wake``) to look again: feed what it kept back, release
    reading, or close once everything is answered."""

    __slots__ = ("held", "wake")

    def __init__(self, transport: asyncio.Transport, wake: Callable[[], None]) -> None:
        super().__init__(transport)
        self.held = False
        self.wake = wake

    def resume_reading(self) -> None:
        if self.held:
            self.wake()
        elif self.read_paused:
            self.read_paused = False
            self._transport.resume_reading()


class _HeadRefusedError(Exception):
    """Raised from a parser callback to stop parsing a refused head."""


def _raw_answer(status: int, message: str, expected: str | None, request_id: str) -> bytes:
    """A whole error answer in bnserve's JSON shape, closing the connection, for the protocol to
    write itself (no request reached the app)."""
    body = error_body(message, request_id, expected)
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode()),
        b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
        b"x-request-id: %s\r\nconnection: close\r\n\r\n" % request_id.encode(), body,
    ])


# Called as a plain function: cheaper per request than super() or a class attribute lookup.
# (None only in a uvicorn that lacks it, which then serves with its own protocol: see the end.)
_uvicorn_on_headers_complete = cast(
    "Callable[[Any], None]", getattr(HttpToolsProtocol, "on_headers_complete", None))


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown"


class _CoalescingProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; its transport writes through ``_HeldWrites``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # flow control keeps the real transport
        self.transport = _HeldWrites(transport, self.tasks, flusher(self.loop))  # type: ignore[assignment]


class _LimitedProtocol(_CoalescingProtocol):
    """Plus the limits per connection (module docstring). Per request, on the usual path, this
    adds a few attribute checks to ``data_received`` and one call to ``on_headers_complete``:
    about 1,800 CPU instructions (valgrind), 1.5% of uvicorn's own per-request cost and 0.5% of
    a bnserve /predict; the rest runs only when a limit is near or a client misbehaves."""

    # Slots, not instance attributes: uvicorn's protocol already has 28 of those, and past 30
    # CPython 3.11 gives up the instance's shared-key dict, which made every attribute access
    # on the protocol, uvicorn's own included, slower (measured: +2 to +4 us per request).
    __slots__ = (
        "_backlog", "_connected_at", "_diverted", "_eof", "_final", "_gate", "_head_bytes",
        "_head_spans", "_held", "_limits", "_lingering", "_max_headers", "_max_pipelined",
        "_parser_done", "_slice", "_wake_pending", "_watch",
    )
    _limits: Limits
    _max_headers: int  # copies of the limits read per request: one load, not two
    _max_pipelined: int
    _slice: int  # bytes parsed at a time: _SLICE, or less under a smaller max_header_bytes
    _gate: _ReadGate
    _held: _HeldWrites
    _connected_at: float
    _head_bytes: int  # bytes of the incomplete head in earlier pieces (a lower bound)
    _head_spans: bool  # the current head came in several pieces: measure it when complete
    _backlog: bytes | None  # read but not parsed: the request queue is full
    _final: bytes | None  # set: close once every request parsed is answered, this first
    _parser_done: bool  # the parser takes no more data (refused, invalid, upgraded)
    _lingering: bool
    _eof: bool
    _diverted: bool  # any of backlog, parser done, lingering: data takes the slow path
    _wake_pending: bool
    _watch: tuple[str, RequestResponseCycle | None, float] | None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits = self._limits = limits_for(self.config)
        self._max_headers, self._max_pipelined = limits.max_headers, limits.max_pipelined
        # A piece never longer than the head limit: a head that arrives within one is under it.
        self._slice = min(_SLICE, limits.max_header_bytes)
        self._gate = self.flow = _ReadGate(transport, self._wake)  # before a request takes it
        self._held = self.transport  # type: ignore[assignment]
        self._held.on_close = self._on_close
        self._connected_at = self.loop.time()
        self._head_bytes = 0
        self._head_spans = self._parser_done = self._lingering = self._eof = False
        self._diverted = self._wake_pending = False
        self._backlog = self._final = self._watch = None
        watchman(self.loop, limits).add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        dropped = self._held.lose()
        if dropped:
            log.info("connection from %s lost with %d bytes of answers not yet written (their "
                     "access lines were logged)", _peer(self.client), dropped)
        self._backlog = None
        watchman(self.loop, self._limits).discard(self)
        HttpToolsProtocol.connection_lost(self, exc)

    def eof_received(self) -> bool:  # type: ignore[override]
        """The client will send nothing more: answer what it sent, then close (returning True
        keeps the transport open for that)."""
        self._eof = True
        if self._lingering:
            self._held.close_now()
        else:
            self._finish_with(self._final or b"")
        return True

    # ---- reading and parsing

    def data_received(self, data: bytes | memoryview) -> None:
        """uvicorn's, plus the queue bound and counting the bytes of an incomplete head."""
        if self._diverted:
            if self._backlog is not None:  # reading is paused: at most what was on its way
                self._backlog += data
            return  # refused, lingering or upgraded: dropped
        if len(data) > self._slice:
            self._feed_pieces(data)
            return
        scope = self.scope
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self._parser_done:  # else a refusal raised it and has answered already
                self._parser_done = self._diverted = True
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self._parser_done = self._diverted = True  # the connection is a WebSocket's now
                watchman(self.loop, self._limits).discard(self)
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        cycle = self.cycle
        if cycle is None or cycle.scope is not self.scope:  # a request head is incomplete
            self._head_incomplete(scope is self.scope, len(data))
        if len(self.pipeline) >= self._max_pipelined:
            self._gate.held = True
            self._gate.pause_reading()

    def _feed_pieces(self, data: bytes | memoryview) -> None:
        """A read longer than a slice, a slice at a time, keeping back what follows once the
        request queue is full."""
        view = memoryview(data)
        for start in range(0, len(view), self._slice):
            if self._diverted:
                return
            if len(self.pipeline) >= self._max_pipelined:
                self._backlog = bytes(view[start:])
                self._diverted = True
                return
            self.data_received(view[start : start + self._slice])

    def _head_incomplete(self, same_head: bool, size: int) -> None:
        self._head_spans = True
        if not same_head:  # begun in this piece: its share of the piece is not known
            self._head_bytes = 0
            return
        self._head_bytes += size  # the whole piece was head
        if self._head_bytes > self._limits.max_header_bytes:
            self._refuse_head(f"the request head is over {self._limits.max_header_bytes} bytes "
                              "and still incomplete")

    def on_headers_complete(self) -> None:
        if len(self.headers) > self._max_headers or self._head_spans:
            self._check_head()
        _uvicorn_on_headers_complete(self)

    def _check_head(self) -> None:
        limits = self._limits
        if len(self.headers) > limits.max_headers:
            self._refuse_head(f"{len(self.headers)} header fields, more than {limits.max_headers}")
            raise _HeadRefusedError
        size = self._head_size()
        if size > limits.max_header_bytes:
            self._refuse_head(f"the request head is {size} bytes, over {limits.max_header_bytes}")
            raise _HeadRefusedError
        self._head_spans = False
        self._head_bytes = 0

    def _head_size(self) -> int:
        """Request line and header fields as parsed (optional whitespace not counted)."""
        line = len(self.parser.get_method()) + len(self.url) + 12  # 2 spaces, HTTP/1.1, CRLF
        return line + sum(len(k) + len(v) + 4 for k, v in self.headers) + 2

    def _refuse_head(self, why: str) -> None:
        limits = self._limits
        rid = os.urandom(8).hex()
        self._parser_done = self._diverted = True
        self._backlog = None
        log.warning("refused a request head from %s: %s; answering 431 and closing the "
                    "connection", _peer(self.client), why,
                    extra={"fields": {"request_id": rid, "status": 431}})
        self._finish_with(_raw_answer(
            431, why, f"a request line and headers of at most {limits.max_header_bytes} bytes "
            f"in at most {limits.max_headers} fields (BNSERVE_MAX_HEADER_BYTES, "
            "BNSERVE_MAX_HEADERS)", rid))

    # ---- answering

    def _wake(self) -> None:
        """uvicorn asked to resume reading while it is held: look again after this turn (by
        then uvicorn has started the next queued request, if any)."""
        if not self._wake_pending:
            self._wake_pending = True
            self.loop.call_soon(self._after_answer)

    def _after_answer(self) -> None:
        self._wake_pending = False
        if self._held.lost or self._lingering:
            return
        limit = self._max_pipelined
        backlog = self._backlog
        if backlog is not None and len(self.pipeline) < limit:
            self._backlog = None
            self._diverted = self._parser_done
            self.data_received(backlog)  # may queue up to the limit and keep the rest again
        if self._final is not None:
            self._maybe_finish()
        elif self._backlog is None and len(self.pipeline) < limit:
            self._gate.held = False
            self._gate.resume_reading()

    def _finish_with(self, final: bytes) -> None:
        """Read no more; once every request parsed is answered, write ``final`` and close."""
        self._final = final
        self._gate.held = True
        self._gate.pause_reading()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.pipeline or self._backlog is not None or self._held.lost:
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and (
            cycle.response_started or not cycle.more_body
        ):
            return  # an answer is still to come (a body that never came will not be waited for)
        if self._final:  # a refusal: the client may be sending still
            self._held.write(self._final)
            self._final = b""
            self._linger()
        else:
            self._held.close_now()

    def _on_close(self) -> bool:
        """uvicorn closes the connection after an answer: if that answer refused a body the
        client may still be sending, close gracefully instead (True: taken over)."""
        if self._lingering:
            return True
        cycle = self.cycle
        if (cycle is not None and cycle.more_body and cycle.response_complete
                and not self._eof and not self._held.lost):
            self._linger()
            return True
        return False

    def _linger(self) -> None:
        """Our answer, then FIN; what the client still sends is read and dropped until it closes
        or for ``_LINGER_SECONDS``, then the socket is closed."""
        held = self._held
        held.flush()
        held.closing = True  # uvicorn: no keep-alive, no next request
        self._lingering = self._parser_done = self._diverted = True
        self._backlog = None
        real = held.transport
        if self._eof or held.lost or real.is_closing() or not real.can_write_eof():
            real.close()
            return
        real.write_eof()
        real.resume_reading()
        self.loop.call_later(_LINGER_SECONDS, held.close_now)

    # ---- timeouts (called by the loop's _Watchman)

    def check_timeouts(self, now: float) -> None:
        held = self._held
        if self._diverted or self._final is not None or self._gate.read_paused or (
            held.is_closing() or held.lost
        ):
            self._watch = None  # the server's turn, or closing anyway
            return
        cycle = self.cycle
        if cycle is None:
            what, since = _HEAD, self._connected_at
        elif cycle.more_body and not cycle.response_complete:
            what, since = _BODY, now
        elif cycle.response_complete and not self.pipeline and self.timeout_keep_alive_task is None:
            what, since = _HEAD, now  # bytes of the next head came, not all of it
        else:  # the app's turn, or idle between requests (uvicorn's keep-alive closes it)
            self._watch = None
            return
        watch = self._watch
        if watch is None or watch[0] is not what or watch[1] is not cycle:
            watch = self._watch = (what, cycle, since)
        waited = now - watch[2]
        if waited >= (self._limits.header_timeout if what is _HEAD else self._limits.body_timeout):
            self._time_out(what, cycle, waited)

    def _time_out(self, what: str, cycle: RequestResponseCycle | None, waited: float) -> None:
        peer = _peer(self.client)
        if what is _HEAD or cycle is None:
            log.info("closing the connection from %s: no complete request head after %.1f s "
                     "(BNSERVE_HEADER_TIMEOUT_SECONDS %g)", peer, waited,
                     self._limits.header_timeout, extra={"fields": {"timeout": "header"}})
            self._held.close_now()
            return
        scope: dict[str, Any] = cycle.scope  # type: ignore[assignment]
        rid = scope.get(REQUEST_ID_KEY) or os.urandom(8).hex()  # the service's, if it ran
        answered = cycle.response_started or bool(self.pipeline)  # another answer is due first
        log.warning("closing the connection from %s: %s %s body incomplete %.1f s after its head "
                    "(BNSERVE_BODY_TIMEOUT_SECONDS %g)%s", peer, scope["method"], scope["path"],
                    waited, self._limits.body_timeout, "" if answered else "; answered 408",
                    extra={"fields": {"request_id": rid, "timeout": "body"}})
        if answered:
            self._held.close_now()
            return
        scope[TIMED_OUT_KEY] = True  # the service's access line says 408, not 499
        self._held.write(_raw_answer(
            408, f"the request body did not arrive within {self._limits.body_timeout:g} s of "
            "its head", "the whole body promptly (BNSERVE_BODY_TIMEOUT_SECONDS)", rid))
        self._linger()  # the client may be sending still, slowly


# ---------------------------------------------------------------- start-up check


def _names(cls: type, *methods: str) -> set[str]:
    """The attributes of ``cls``, and the attribute names its ``methods`` use (instance
    attributes are only found there, mostly in ``__init__``)."""
    found = set(dir(cls))
    for m in methods:
        code = getattr(getattr(cls, m, None), "__code__", None)
        if code is not None:
            found |= set(code.co_names)
    return found


def _missing_internals() -> list[str]:
    """The private parts of uvicorn this module relies on that this uvicorn does not have."""
    needed = {
        HttpToolsProtocol: (
            _names(HttpToolsProtocol, "__init__", "connection_made", "on_message_begin",
                   "on_response_complete"),  # which must still resume reading after an answer
            ("parser", "pipeline", "cycle", "scope", "headers", "url", "flow", "tasks", "loop",
             "resume_reading",
             "config", "client", "logger", "timeout_keep_alive_task", "data_received",
             "on_headers_complete", "on_response_complete", "connection_lost", "eof_received",
             "_unset_keepalive_if_required", "send_400_response", "_should_upgrade",
             "handle_websocket_upgrade", "_unsupported_upgrade_warning"),
        ),
        RequestResponseCycle: (
            _names(RequestResponseCycle, "__init__"),
            ("scope", "more_body", "response_started", "response_complete"),
        ),
        FlowControl: (_names(FlowControl, "__init__"),
                      ("read_paused", "_transport", "pause_reading", "resume_reading")),
    }
    missing = [f"{cls.__name__}.{n}" for cls, (have, want) in needed.items()
               for n in want if n not in have]
    if not all(hasattr(httptools, n) for n in ("HttpParserError", "HttpParserUpgrade")):
        missing.append("httptools.HttpParserError/HttpParserUpgrade")
    if not callable(getattr(Config, "load", None)) or "loaded_app" not in _names(Config, "load"):
        missing.append("Config.loaded_app")
    return missing


_MISSING = _missing_internals()
Protocol: type[HttpToolsProtocol] = _LimitedProtocol
if _MISSING:  # fail safe, and say so
    Protocol = HttpToolsProtocol
    log.warning(
        "uvicorn's httptools protocol lacks what app/protocol.py relies on (%s): serving with "
        "uvicorn's own protocol; answers are not coalesced and the per-connection limits "
        "(pipelining, request head size, header and body timeouts, half-close) are OFF. "
        "Install the uvicorn version pyproject.toml pins.", ", ".join(_MISSING),
    )
