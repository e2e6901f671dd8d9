"""What several test modules need to talk to the service below the HTTP client libraries: one
request through the ASGI app as uvicorn makes it, and one answer read off a raw socket."""

from __future__ import annotations

import socket
from collections.abc import MutableMapping
from typing import Any

from app.service import Service

Response = tuple[int, bytes]


async def post(app: Service, path: str, body: bytes) -> Response:
    """One request through the ASGI app, as uvicorn would make it."""
    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", b"%d" % len(body))]}
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], sent[1]["body"]


def read_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    return buf


def read_answer(sock: socket.socket, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One answer, read to its last byte and not beyond (pipelined answers follow it); an answer
    to HEAD has a Content-Length but no body (``head_only``)."""
    buf = b""
    while not buf.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed mid-head: {buf!r}")
        buf += chunk
    status_line, *lines = buf.decode().strip().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
    body = b"" if head_only else read_exactly(sock, int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body
