"""The HTTP protocol bnserve runs under uvicorn: httptools, with answers written together.

uvicorn's httptools protocol writes each answer to its socket at once: the status line and headers
in one send, the body in another. Under load that is the expensive part of a small answer: each
send on a socket whose reader sleeps wakes that reader (on a VM, a cross-CPU interrupt), and
measured at 16 connections it cost 22 us of kernel time per request, more than the whole
prediction.

``Protocol`` changes one thing: while other requests are in flight, a connection's writes are
held until the end of the event-loop iteration and then written with one send per connection,
after every request that was ready in the iteration has been answered (the idea of Netty's
FlushConsolidationHandler). The client reads all of them in one wake-up. A request that is alone
in flight is written at once, as before, so at concurrency 1 it costs nothing and never waits
a loop turn. Bytes and their order on each connection are unchanged; held bytes are written
before the connection is closed and dropped only if it is already gone.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# ``uvicorn.Config(http=...)`` takes this import string; so does ``uvicorn --http``.
PROTOCOL = "app.protocol:Protocol"


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
    the transport's interface passes through."""

    __slots__ = ("_flusher", "_held", "_in_flight", "transport")

    def __init__(self, transport: asyncio.Transport, in_flight: set[Any],
                 flusher: _Flusher) -> None:
        self.transport = transport
        self._in_flight = in_flight  # the server's running request tasks, all connections
        self._flusher = flusher
        self._held: list[bytes] = []

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
        if not self.transport.is_closing():  # connection lost meanwhile: no one to read it
            self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self._held.clear()
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; its transport writes through ``_HeldWrites``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # flow control keeps the real transport
        in_flight = getattr(self, "tasks", None)  # uvicorn's set of running request tasks
        if in_flight is None:  # a uvicorn without it: plain writes, as uvicorn does them
            return
        self.transport = _HeldWrites(transport, in_flight, flusher(self.loop))  # type: ignore[assignment]
