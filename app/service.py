"""The ASGI front of the service: request ids, limits, metrics, access logs, and the fast path.

Every HTTP request passes through ``Service``. ``POST /predict`` and ``POST /predict/batch`` are
answered right here, without FastAPI's routing, request objects or response classes: read the
body (with the size limit), parse it with orjson, convert it with vectorised checks for the
model's input shape (app/inputs.py, app/tensors.py), one ONNX Runtime call (or, with adaptive
batching on, a share of one: app/batching.py), the answer for its output kind (app/answers.py).
Everything else (health, model metadata, metrics, docs, 404/405) is passed on to the FastAPI app,
whose OpenAPI schema also documents the two fast routes; HEAD is served wherever GET is (the GET's
status and headers, no body).

Per request this layer adds: an ``X-Request-ID`` (the client's, if it is sane, else a new one;
always echoed), a 413 for a Content-Length over the limit, metrics (health and metrics routes
excluded), one access log line (app/logs.py), and a JSON 500 with the request id for anything
unexpected, whose traceback is logged. Rarer checks, each only when its header is present or
its setting is on: a Transfer-Encoding other than chunked is 501 on any route; a body with a
Content-Encoding other than identity is 415 (bodies are small JSON: refusing compressed ones
is simpler and safer than a decompressor with its own size limit); with bearer-token auth on
(app/auth.py), the routes in ``PROTECTED_ROUTES`` answer 401 without a valid token.

An error answered before the request's body was read to its end (anything but the 400/422 of a
body that was parsed) carries ``Connection: close``: the client may not send that body at all
(it was refused), and what it sends next must not be read as the rest of it. The protocol then
closes gracefully (app/protocol.py: the answer is followed by FIN, not RST).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from time import perf_counter

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import inputs
from app.auth import ApiKeys
from app.batching import Batcher
from app.errors import (
    INTERNAL_ERROR_MESSAGE,
    REQUEST_ID_KEY,
    TIMED_OUT_KEY,
    BadInputError,
    MalformedBodyError,
    MethodNotAllowedError,
    NotReadyError,
    PayloadTooLargeError,
    ServiceError,
    UnsupportedMediaTypeError,
    UnsupportedTransferCodingError,
    error_body,
)
from app.metrics import UNMATCHED_ROUTE
from app.predictor import Outputs
from app.state import Model, Runtime

PREDICT = "/predict"
PREDICT_BATCH = "/predict/batch"
PROTECTED_ROUTES = frozenset({PREDICT, PREDICT_BATCH})  # need a bearer token when auth is on
UNOBSERVED = frozenset({"/livez", "/readyz", "/metrics"})  # not in request metrics
CLIENT_CLOSED = 499  # nginx's code for "client went away before the answer", logs only
__all__ = ["PREDICT", "PREDICT_BATCH", "PROTECTED_ROUTES", "REQUEST_ID_KEY", "Service"]

_REQUEST_ID_OK = re.compile(rb"[\x21-\x7e]{1,128}")  # visible ASCII: safe to log and echo
_JSON_HEADERS = [(b"content-type", b"application/json")]
_CLOSE = (b"connection", b"close")

log = logging.getLogger("bnserve.service")


class _ClientGoneError(Exception):
    pass


def _has_body(content_length: bytes | None, transfer_coding: bytes | None) -> bool:
    return transfer_coding is not None or (content_length is not None and content_length != b"0")


def _check_transfer_coding(value: bytes) -> None:
    """Only ``chunked`` (the HTTP parser has already refused it anywhere but last)."""
    codings = [c.strip().lower() for c in value.split(b",") if c.strip()]
    if codings != [b"chunked"]:
        raise UnsupportedTransferCodingError(
            f"unsupported Transfer-Encoding {value.decode(errors='replace')!r}",
            expected="no Transfer-Encoding, or 'Transfer-Encoding: chunked' alone",
        )


def _check_content_coding(value: bytes) -> None:
    if any(c.strip().lower() not in (b"identity", b"") for c in value.split(b",")):
        raise UnsupportedMediaTypeError(
            f"unsupported Content-Encoding {value.decode(errors='replace')!r}: compressed "
            "bodies are not accepted",
            expected="an uncompressed JSON body (no Content-Encoding, or identity)",
        )


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers.items()]


class Service:
    def __init__(self, api: ASGIApp, rt: Runtime) -> None:
        self.api = api  # the FastAPI app (routes, docs, lifespan)
        self.rt = rt
        self.settings = rt.settings  # also read by the protocol for its limits (app/protocol.py)
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
        self.auth = ApiKeys.from_settings(s)  # None: auth off
        if self.auth is not None:
            log.info("bearer-token auth on for %s (%d token(s))",
                     ", ".join(sorted(PROTECTED_ROUTES)), len(self.auth))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (and anything else) belongs to FastAPI
            await self.api(scope, receive, send)
            return
        start = perf_counter()
        request_id = content_type = content_length = transfer_coding = content_coding = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                request_id = value
            elif key == b"content-type":
                content_type = value
            elif key == b"content-length":
                content_length = value
            elif key == b"transfer-encoding":
                transfer_coding = value
            elif key == b"content-encoding":
                content_coding = value
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
        api_scope = scope  # what FastAPI sees (a GET for a HEAD)
        try:
            if transfer_coding is not None:
                _check_transfer_coding(transfer_coding)
            if self.auth is not None and path in PROTECTED_ROUTES:
                self.auth.check(scope["headers"])
            if fast:
                try:
                    if content_coding is not None:
                        _check_content_coding(content_coding)
                    body = await self._predict(scope, receive, path, content_type, content_length)
                    status, headers = 200, _JSON_HEADERS
                except ServiceError as e:
                    status, body = e.status_code, error_body(e.message, rid, e.expected)
                    headers = [*_JSON_HEADERS, *_encode(e.headers)]
                    if not isinstance(e, BadInputError) and _has_body(content_length,
                                                                      transfer_coding):
                        headers.append(_CLOSE)  # refused before its body was read to the end
                started = True
                await send({"type": "http.response.start", "status": status,
                            "headers": [*headers, (b"content-length", b"%d" % len(body)),
                                        (b"x-request-id", request_id)]})
                await send({"type": "http.response.body", "body": body})
            else:
                self._check_length(content_length)
                head = scope["method"] == "HEAD"  # served as GET; the body is left out
                if head:
                    api_scope = {**scope, "method": "GET"}

                async def send_with_id(message: Message) -> None:
                    nonlocal status, started
                    if message["type"] == "http.response.start":
                        status, started = message["status"], True
                        message = {**message, "headers": [*message.get("headers", ()),
                                                          (b"x-request-id", request_id)]}
                    elif head:
                        message = {**message, "body": b""}
                    await send(message)

                await self.api(api_scope, receive, send_with_id)
        except _ClientGoneError:
            # the protocol answered 408 itself when the body stopped coming (app/protocol.py)
            status = 408 if scope.get(TIMED_OUT_KEY) else CLIENT_CLOSED
        except ServiceError as e:  # raised here before FastAPI was called: nothing sent yet
            status = e.status_code
            await self._send_error(send, request_id, e.status_code, e.message, e.expected,
                                   e.headers, close=_has_body(content_length, transfer_coding))
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
                route = path if fast else getattr(api_scope.get("route"), "path",
                                                  UNMATCHED_ROUTE)
                self.metrics.in_flight.dec()
                self.metrics.observe_request(route, status, elapsed)
            if self.access_log.enabled:
                self.access_log.log(rid, scope["method"], path, status, elapsed)

    async def _send_error(
        self, send: Send, request_id: bytes, status: int, message: str,
        expected: str | None = None, headers: dict[str, str] | None = None, close: bool = False,
    ) -> None:
        body = error_body(message, request_id.decode(), expected)
        await send({"type": "http.response.start", "status": status,
                    "headers": [*_JSON_HEADERS, *_encode(headers or {}),
                                (b"content-length", b"%d" % len(body)),
                                (b"x-request-id", request_id), *([_CLOSE] if close else [])]})
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
            outputs = self._run(model, x)  # one ONNX Runtime call per request
        else:  # only a parsed, valid example gets here to join a batch
            outputs = await self.batcher.predict(x)
            if self.rt.model is not model:  # a reload landed while it waited: the run may have
                outputs = self._run(model, x)  # used the new model; answer on its own model
        answer = model.answer(outputs, batch)  # 422 if an output is not finite (app/answers.py)
        if model.classifier and model is self.rt.model:  # the class counters are the model's
            self.metrics.count_predictions(outputs[1])
        return answer

    def _run(self, model: Model, x: inputs.F32) -> Outputs:
        """Run on the model the request was decoded for and will be answered as: a reload may
        have switched ``rt.model`` while its body arrived."""
        t0 = perf_counter()
        outputs = model.predictor.predict(x)
        self.metrics.inference_seconds.observe(perf_counter() - t0)
        return outputs

    def _run_batch(self, x: inputs.F32) -> Outputs:
        self.metrics.batch_size.observe(len(x))
        model = self.rt.model
        assert model is not None  # a run only holds rows of requests that found a model
        return self._run(model, x)

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
