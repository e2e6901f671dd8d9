"""app/protocol.py: writes held while other requests are in flight, written once per connection
at the end of the loop iteration; bytes, order and closing unchanged.

The unit tests drive ``_HeldWrites`` with a recording transport; the end-to-end tests hold one
request open on the real server (half its body sent), so that every answer on a second
connection takes the holding path, and check pipelining, HEAD, 100-continue and
``Connection: close`` there byte for byte."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson
import pytest

import app.protocol
from app.protocol import PROTOCOL, Protocol, _HeldWrites, _missing_internals, flusher
from tests.app.wire import read_answer, read_exactly


class Recorder:
    """The transport side: what was written, in which order, and when it was closed."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bytes]] = []
        self.closing = False
        self.closing_accepts_writes = False  # as asyncio's and uvloop's do until they are closed

    def write(self, data: bytes) -> None:
        assert not self.closing or self.closing_accepts_writes, "write after close"
        self.events.append(("write", data))

    def close(self) -> None:
        self.closing = True
        self.events.append(("close", b""))

    def abort(self) -> None:
        self.closing = True
        self.events.append(("abort", b""))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str) -> Any:
        return f"extra:{name}"


def held(rec: Recorder, in_flight: set[Any]) -> _HeldWrites:
    return _HeldWrites(rec, in_flight, flusher(asyncio.get_running_loop()))  # type: ignore[arg-type]


def test_the_service_runs_on_this_protocol() -> None:
    import importlib  # noqa: PLC0415

    module, name = PROTOCOL.split(":")
    assert getattr(importlib.import_module(module), name) is Protocol


def test_the_uvicorn_internals_it_relies_on_are_there_and_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _missing_internals() == []  # else Protocol is uvicorn's own, with a warning
    assert Protocol is app.protocol._LimitedProtocol

    class Cycle:  # a RequestResponseCycle that no longer has what the protocol reads
        def __init__(self) -> None:
            self.scope: dict[str, Any] = {}

    monkeypatch.setattr(app.protocol, "RequestResponseCycle", Cycle)
    assert _missing_internals() == ["Cycle.more_body", "Cycle.response_started",
                                    "Cycle.response_complete"]


def test_a_request_alone_in_flight_is_written_at_once() -> None:
    async def main() -> list[tuple[str, bytes]]:
        rec = Recorder()
        conn = held(rec, {"this request"})
        conn.write(b"HTTP/1.1 200 OK\r\n\r\n")
        conn.write(b"body")
        return list(rec.events)  # before any loop turn

    assert asyncio.run(main()) == [("write", b"HTTP/1.1 200 OK\r\n\r\n"), ("write", b"body")]


def test_with_company_writes_wait_for_the_loop_turn_and_go_out_once_per_connection() -> None:
    async def main() -> None:
        a, b = Recorder(), Recorder()
        in_flight = {"a", "b", "c"}
        conn_a, conn_b = held(a, in_flight), held(b, in_flight)
        turns = flusher(asyncio.get_running_loop()).flushes
        conn_a.write(b"head-a ")
        conn_b.write(b"head-b ")
        conn_a.write(b"body-a")
        conn_b.write(b"body-b")
        assert a.events == []  # held until the end of this iteration
        assert b.events == []
        await asyncio.sleep(0)
        assert a.events == [("write", b"head-a body-a")]
        assert b.events == [("write", b"head-b body-b")]
        assert flusher(asyncio.get_running_loop()).flushes == turns + 1  # one callback for both
        # once written, the next answer with company is held again, and alone goes at once
        conn_a.write(b"next")
        assert a.events == [("write", b"head-a body-a")]
        await asyncio.sleep(0)
        assert a.events[-1] == ("write", b"next")
        in_flight.clear()
        conn_a.write(b"alone")
        assert a.events[-1] == ("write", b"alone")

    asyncio.run(main())


def test_close_writes_what_is_held_first_and_only_a_lost_connection_drops_it() -> None:
    async def main() -> None:
        in_flight = {"a", "b"}
        rec = Recorder()
        conn = held(rec, in_flight)
        conn.write(b"answer")
        conn.close()
        assert rec.events == [("write", b"answer"), ("close", b"")]
        await asyncio.sleep(0)  # the scheduled flush finds nothing left to write
        assert rec.events == [("write", b"answer"), ("close", b"")]

        half_closed = Recorder()
        conn = held(half_closed, in_flight)
        conn.write(b"answer")
        half_closed.closing = True  # closing (the peer half-closed): it still sends what it gets
        half_closed.closing_accepts_writes = True
        await asyncio.sleep(0)
        assert half_closed.events == [("write", b"answer")]

        gone = Recorder()
        conn = held(gone, in_flight)
        conn.write(b"answer")
        assert conn.lose() == len(b"answer")  # connection_lost: no one to read it
        await asyncio.sleep(0)
        assert gone.events == []

        aborted = Recorder()
        conn = held(aborted, in_flight)
        conn.write(b"answer")
        conn.abort()
        await asyncio.sleep(0)
        assert aborted.events == [("abort", b"")]
        assert conn.get_extra_info("peername") == "extra:peername"  # the rest passes through

    asyncio.run(main())


# ---------------------------------------------------------------- on the real server


def post_head(path: str, length: int, rid: str, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\nX-Request-ID: {rid}\r\n{extra}\r\n").encode()


@pytest.mark.slow
def test_answers_with_a_request_in_flight_are_whole_ordered_and_closed_right(
    start_server: Any, trained: Any,
) -> None:
    server = start_server()
    server.wait_ready()
    row = orjson.dumps({"features": [float(v) for v in trained.result.x_val[0]]})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as fast:
        # a request whose body is half sent stays in flight: the server now has company
        slow.sendall(post_head("/predict", len(row), "slow") + row[:10])

        # three pipelined requests in one send: three answers, in order, each whole
        fast.sendall(b"".join(post_head("/predict", len(row), f"p{i}") + row for i in range(3)))
        answers = [read_answer(fast) for _ in range(3)]
        assert [(s, h["x-request-id"]) for s, h, _ in answers] == [(200, "p0"), (200, "p1"),
                                                                    (200, "p2")]
        assert len({b for _, _, b in answers}) == 1  # the same row thrice: the same answer
        assert orjson.loads(answers[0][2])["class"] in trained.class_names

        # a head-only answer (HEAD on a GET route: GET's status and Content-Length, no body)
        fast.sendall(b"HEAD /livez HTTP/1.1\r\nHost: t\r\nX-Request-ID: head\r\n\r\n")
        status, headers, _ = read_answer(fast, head_only=True)
        assert (status, headers["x-request-id"]) == (200, "head")

        # Expect: 100-continue: the interim answer arrives before the body is sent
        fast.sendall(post_head("/predict", len(row), "cont", "Expect: 100-continue\r\n"))
        assert read_exactly(fast, 25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        fast.sendall(row)
        status, headers, body = read_answer(fast)
        assert (status, headers["x-request-id"], body) == (200, "cont", answers[0][2])

        # Connection: close: the whole answer, then the end of the stream
        fast.sendall(post_head("/predict", len(row), "last", "Connection: close\r\n") + row)
        status, headers, body = read_answer(fast)
        assert (status, headers["x-request-id"], body) == (200, "last", answers[0][2])
        assert fast.recv(1) == b""

        slow.sendall(row[10:])  # the held-open request completes normally
        status, headers, body = read_answer(slow)
        assert (status, headers["x-request-id"], body) == (200, "slow", answers[0][2])
    assert server.terminate() == 0

