"""The ASGI front of the service: request ids, limits, metrics, access logs, and the fast path.

Every HTTP request passes through ``Service``. ``POST /predict`` and ``POST /predict/batch`` are
answered right here, without FastAPI's routing, request objects or response classes: read the
body (with the size limit), parse it with orjson, convert it with vectorised checks for the
model's input shape (app/inputs.py, app/tensors.py), one ONNX Runtime call (or, with adaptive
batching on, a share of one: app/batching.py), the answer for its output kind (app/answers.py).
Everything else (health, model metadata, metrics, docs, 404/405) is passed on to the FastAPI app,
whose OpenAPI schema also documents the two fast routes.

Per request this layer adds: an ``X-Request-ID`` (the client's, if it is sane, else a new one;
always echoed), a 413 for a Content-Length over the limit, metrics (health and metrics routes
excluded), one access log line (app/logs.py), and a JSON 500 with the request id for anything
unexpected, whose traceback is logged.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from time import perf_counter

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import inputs
from app.batching import Batcher
from app.errors import (
    INTERNAL_ERROR_MESSAGE,
    MalformedBodyError,
    MethodNotAllowedError,
    NotReadyError,
    PayloadTooLargeError,
    ServiceError,
    UnsupportedMediaTypeError,
    error_body,
)
from app.metrics import UNMATCHED_ROUTE
from app.predictor import Outputs
from app.state import Runtime

PREDICT = "/predict"
PREDICT_BATCH = "/predict/batch"
UNOBSERVED = frozenset({"/livez", "/readyz", "/metrics"})  # not in request metrics
REQUEST_ID_KEY = "bnserve.request_id"  # where handlers find the id in the ASGI scope
CLIENT_CLOSED = 499  # nginx's code for "client went away before the answer", logs only

_REQUEST_ID_OK = re.compile(rb"[\x21-\x7e]{1,128}")  # visible ASCII: safe to log and echo
_JSON_HEADERS = [(b"content-type", b"application/json")]

log = logging.getLogger("bnserve.service")


class _ClientGoneError(Exception):
    pass


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers.items()]


class Service:
    def __init__(self, api: ASGIApp, rt: Runtime) -> None:
        self.api = api  # the FastAPI app (routes, docs, lifespan)
        self.rt = rt
        self.metrics = rt.metrics
        self.max_body = rt.settings.max_body_bytes
        self.max_batch = rt.settings.max_batch
        self.access_log = rt.access_log
        # New request ids: a random prefix per process and a counter, unique without a syscall
        self._id_prefix, self._ids = os.urandom(4).hex().encode(), itertools.count()
        self.batcher: Batcher | None = None  # adaptive batching of POST /predict (app/batching.py)
        s = rt.settings
        if s.batching:  # runs never exceed max_batch rows: the largest size warm-up checks
            self.batcher = Batcher(self._run_batch, min(s.batch_max_size, s.max_batch),
                                   s.batch_max_wait_ms / 1000)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (and anything else) belongs to FastAPI
            await self.api(scope, receive, send)
            return
        start = perf_counter()
        request_id = content_type = content_length = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                request_id = value
            elif key == b"content-type":
                content_type = value
            elif key == b"content-length":
                content_length = value
        if request_id is None or not _REQUEST_ID_OK.fullmatch(request_id):
            request_id = b"%s%08x" % (self._id_prefix, next(self._ids))
        rid = request_id.decode()
        scope[REQUEST_ID_KEY] = rid
        path: str = scope["path"]
        observed = path not in UNOBSERVED
        if observed:
            self.metrics.in_flight.inc()
        fast = path in (PREDICT, PREDICT_BATCH)
        status, started = 500, False
        try:
            if fast:
                try:
                    body = await self._predict(scope, receive, path, content_type, content_length)
                    status, headers = 200, _JSON_HEADERS
                except ServiceError as e:
                    status, body = e.status_code, error_body(e.message, rid, e.expected)
                    headers = [*_JSON_HEADERS, *_encode(e.headers)]
                started = True
                await send({"type": "http.response.start", "status": status,
                            "headers": [*headers, (b"content-length", b"%d" % len(body)),
                                        (b"x-request-id", request_id)]})
                await send({"type": "http.response.body", "body": body})
            else:
                self._check_length(content_length)

                async def send_with_id(message: Message) -> None:
                    nonlocal status, started
                    if message["type"] == "http.response.start":
                        status, started = message["status"], True
                        message = {**message, "headers": [*message.get("headers", ()),
                                                          (b"x-request-id", request_id)]}
                    await send(message)

                await self.api(scope, receive, send_with_id)
        except _ClientGoneError:
            status = CLIENT_CLOSED
        except ServiceError as e:  # raised here before FastAPI was called: nothing sent yet
            status = e.status_code
            await self._send_error(send, request_id, e.status_code, e.message, e.expected,
                                   e.headers)
        except Exception:
            log.exception("internal error while handling %s %s", scope["method"], path,
                          extra={"fields": {"request_id": rid}})
            status = 500
            if not started:  # otherwise FastAPI already answered with the same JSON 500
                await self._send_error(send, request_id, 500, INTERNAL_ERROR_MESSAGE)
        finally:
            elapsed = perf_counter() - start
            if observed:
                # the route template FastAPI matched (it records it in the scope), never raw paths
                route = path if fast else getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
                self.metrics.in_flight.dec()
                self.metrics.observe_request(route, status, elapsed)
            if self.access_log.enabled:
                self.access_log.log(rid, scope["method"], path, status, elapsed)

    async def _send_error(
        self, send: Send, request_id: bytes, status: int, message: str,
        expected: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        body = error_body(message, request_id.decode(), expected)
        await send({"type": "http.response.start", "status": status,
                    "headers": [*_JSON_HEADERS, *_encode(headers or {}),
                                (b"content-length", b"%d" % len(body)),
                                (b"x-request-id", request_id)]})
        await send({"type": "http.response.body", "body": body})

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"the request body is larger than the limit of {self.max_body} bytes",
            expected=f"a body of at most {self.max_body} bytes (POST /predict/batch takes up to "
            f"{self.max_batch} instances per request)",
        )

    def _check_length(self, content_length: bytes | None) -> None:
        if content_length is None:
            return
        try:
            length = int(content_length)
        except ValueError:
            raise MalformedBodyError(
                f"invalid Content-Length header {content_length.decode(errors='replace')!r}"
            ) from None
        if length > self.max_body:
            raise self._too_large()

    async def _predict(
        self, scope: Scope, receive: Receive, path: str, content_type: bytes | None,
        content_length: bytes | None,
    ) -> bytes:
        if scope["method"] != "POST":
            raise MethodNotAllowedError(scope["method"], path, "POST")
        model = self.rt.model
        if model is None:
            raise NotReadyError(self.rt.readiness.reason)
        if content_type is None or content_type.split(b";", 1)[0].strip().lower() != (
            b"application/json"
        ):
            got = "none" if content_type is None else repr(content_type.decode(errors="replace"))
            raise UnsupportedMediaTypeError(f"unsupported Content-Type {got}",
                                       expected="Content-Type: application/json")
        self._check_length(content_length)  # before a single byte of the body is read
        batch = path == PREDICT_BATCH
        x = inputs.parse(await self._read_body(receive), model.batch if batch else model.single)
        if batch or self.batcher is None:
            outputs = self._run(x)  # one ONNX Runtime call per request
        else:  # only a parsed, valid example gets here to join a batch
            outputs = await self.batcher.predict(x)
        answer = model.answer(outputs, batch)  # 422 if an output is not finite (app/answers.py)
        if model.classifier:
            self.metrics.count_predictions(outputs[1])
        return answer

    def _run(self, x: inputs.F32) -> Outputs:
        model = self.rt.model
        assert model is not None  # only called once a request found the model ready
        t0 = perf_counter()
        outputs = model.predictor.predict(x)
        self.metrics.inference_seconds.observe(perf_counter() - t0)
        return outputs

    def _run_batch(self, x: inputs.F32) -> Outputs:
        self.metrics.batch_size.observe(len(x))
        return self._run(x)

    async def _read_body(self, receive: Receive) -> bytes:
        """The whole body, counting bytes as they arrive (chunked bodies have no length)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _ClientGoneError
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
