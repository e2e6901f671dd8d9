"""The ASGI front of the service: the request context, then the routes answered here.

Every HTTP request passes through ``Service``. Reading top to bottom:

- ``__call__`` is the request context, the same for every route: an ``X-Request-ID`` (the
  client's, if it is sane, else a new one; always echoed), the route from the one route table
  (app/routes.py), the checks that need no body (a Transfer-Encoding other than chunked is 501 on
  any route; bearer-token auth on the routes marked ``protected``; a Content-Length over the limit
  is 413), metrics by route template (probes and scrapes excluded), one access log line
  (app/logs.py), and the error answers: a ``ServiceError`` in its protocol's shape
  (app/errors.py ``render``), anything unexpected a 500 whose traceback is logged.
- The fast routes (``Route.fast``): bnserve's ``/predict`` and ``/predict/batch`` and all of the
  Open Inference Protocol's ``/v2`` routes, answered here without FastAPI's routing, request
  objects or response classes. Predictions take one path, ``_infer``: the protocol's codec
  decodes the body (app/codecs/), the data plane runs it (app/plane.py: one ONNX Runtime call,
  or a share of one with adaptive batching), the codec encodes the outputs.
- Everything else (health, model metadata, metrics, docs) is passed on to the FastAPI app, which
  also documents the fast routes in its OpenAPI schema. HEAD is served wherever GET is (the
  GET's status and headers, no body).

A body with a Content-Encoding other than identity is 415 (bodies are small: refusing
compressed ones is simpler and safer than a decompressor with its own size limit). An error
answered before the request's body was read to its end (anything but a ``BadInputError`` of a
body that was read) carries ``Connection: close``: the client may not send that body at all (it
was refused), and what it sends next must not be read as the rest of it. The protocol then
closes gracefully (app/protocol.py: the answer is followed by FIN, not RST).

Middleware: wrap the app ``create_app`` returns (``CORSMiddleware(create_app(s), ...)``) and it
sees every request; middleware added to the inner FastAPI app (``service.api``) sees only the
routes FastAPI answers, never the fast ones.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Awaitable, Callable
from time import perf_counter

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import routes
from app.auth import ApiKeys
from app.codecs import Codec, Headers, bnserve, v2
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
    render,
)
from app.metrics import UNMATCHED_ROUTE
from app.plane import DataPlane
from app.state import Model, Runtime

CLIENT_CLOSED = 499  # nginx's code for "client went away before the answer", logs only
__all__ = ["REQUEST_ID_KEY", "Service"]

_REQUEST_ID_OK = re.compile(rb"[\x21-\x7e]{1,128}")  # visible ASCII: safe to log and echo
_JSON = bnserve.JSON_HEADERS
_CLOSE = (b"connection", b"close")
Answer = tuple[int, bytes, Headers]  # status, body, headers
Handler = Callable[["Exchange", dict[str, str], Receive], Awaitable[Answer]]

log = logging.getLogger("bnserve.service")


class _ClientGoneError(Exception):
    pass


class NotFoundError(ServiceError):
    status_code = 404


class Exchange:
    """One request's context: its id, the headers the service acts on, and what was answered."""

    __slots__ = ("content_coding", "content_length", "content_type", "header_length", "method",
                 "path", "request_id", "rid", "scope", "started", "status", "transfer_coding")

    def __init__(self, scope: Scope, new_id: Callable[[], bytes]) -> None:
        self.scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        request_id = self.content_type = self.content_length = self.transfer_coding = None
        self.content_coding = self.header_length = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                request_id = value
            elif key == b"content-type":
                self.content_type = value
            elif key == b"content-length":
                self.content_length = value
            elif key == b"transfer-encoding":
                self.transfer_coding = value
            elif key == b"content-encoding":
                self.content_coding = value
            elif key == v2.HEADER_LENGTH:
                self.header_length = value
        if request_id is None or not _REQUEST_ID_OK.fullmatch(request_id):
            request_id = new_id()
        self.request_id: bytes = request_id
        self.rid = request_id.decode()
        scope[REQUEST_ID_KEY] = self.rid
        self.status = 500
        self.started = False  # the response has begun: too late for an error answer

    @property
    def has_body(self) -> bool:
        return self.transfer_coding is not None or (
            self.content_length is not None and self.content_length != b"0")


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
            expected="an uncompressed body (no Content-Encoding, or identity)",
        )


def _encode(headers: dict[str, str]) -> Headers:
    return [(k.encode(), v.encode()) for k, v in headers.items()]


def _json(doc: object, status: int = 200) -> Answer:
    return status, orjson.dumps(doc), _JSON


class Service:
    def __init__(self, api: ASGIApp, rt: Runtime, version: str) -> None:
        self.api = api  # the FastAPI app (routes, docs, lifespan)
        self.rt = rt
        self.settings = rt.settings  # also read by the protocol for its limits (app/protocol.py)
        self.version = version
        self.metrics = rt.metrics
        self.max_body = rt.settings.max_body_bytes
        self.max_batch = rt.settings.max_batch
        self.access_log = rt.access_log
        # New request ids: a random prefix per process and a counter, unique without a syscall
        self._id_prefix, self._ids = os.urandom(4).hex().encode(), itertools.count()
        self.plane = DataPlane(rt)
        self.model_name = rt.settings.model_name or rt.settings.model_path.stem
        self.v2 = v2.V2Codec(self.model_name, self.max_batch)
        handlers: dict[str, Handler] = {
            "predict": self._predict, "predict_batch": self._predict_batch,
            "v2_server": self._v2_server, "v2_live": self._v2_live, "v2_ready": self._v2_ready,
            "v2_model": self._v2_model, "v2_model_ready": self._v2_model_ready,
            "v2_infer": self._v2_infer,
        }
        self._fast = {r.name: handlers[r.name] for r in routes.ROUTES if r.fast}
        self.auth = ApiKeys.from_settings(rt.settings)  # None: auth off
        if self.auth is not None:
            log.info("bearer-token auth on for %s (%d token(s))",
                     ", ".join(str(r) for r in routes.ROUTES if r.protected), len(self.auth))

    def _new_id(self) -> bytes:
        return b"%s%08x" % (self._id_prefix, next(self._ids))

    # ---------------------------------------------------------------- the request context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (and anything else) belongs to FastAPI
            await self.api(scope, receive, send)
            return
        start = perf_counter()
        ex = Exchange(scope, self._new_id)
        found = routes.match(ex.path)
        route = found.route(ex.method) if found else None
        observed = found is None or found.routes[0].observed
        protocol = route.protocol if route else (
            "v2" if ex.path.startswith(routes.V2_PREFIX) else "bnserve")
        if observed:
            self.metrics.in_flight.inc()
        try:
            if ex.transfer_coding is not None:
                _check_transfer_coding(ex.transfer_coding)
            if route is None and found is not None:
                raise MethodNotAllowedError(ex.method, ex.path, found.allowed)
            if route is None and protocol == "v2":
                raise NotFoundError(f"no route {ex.path}",
                                    expected="one of: " + routes.listing())
            if route is not None and route.protected and self.auth is not None:
                self.auth.check(scope["headers"])
            if route is not None and route.fast and found is not None:
                status, body, headers = await self._fast[route.name](ex, found.params, receive)
                await self._send(send, ex, status, body, headers)
            else:
                self._check_length(ex.content_length)
                await self._pass_on(ex, receive, send)
        except _ClientGoneError:
            # the protocol answered 408 itself when the body stopped coming (app/protocol.py)
            ex.status = 408 if scope.get(TIMED_OUT_KEY) else CLIENT_CLOSED
        except ServiceError as e:
            if not ex.started:
                status, body = render(protocol, e, ex.rid)
                close = ex.has_body and not isinstance(e, BadInputError)
                await self._send(send, ex, status, body, [*_JSON, *_encode(e.headers)], close)
        except Exception:
            log.exception("internal error while handling %s %s", ex.method, ex.path,
                          extra={"fields": {"request_id": ex.rid}})
            if not ex.started:  # otherwise FastAPI already answered with the same JSON 500
                _, body = render(protocol, ServiceError(INTERNAL_ERROR_MESSAGE), ex.rid)
                await self._send(send, ex, 500, body, _JSON)
            ex.status = 500
        finally:
            elapsed = perf_counter() - start
            if observed:  # the route template, never the raw path
                self.metrics.in_flight.dec()
                self.metrics.observe_request(found.template if found else UNMATCHED_ROUTE,
                                             ex.status, elapsed)
            if self.access_log.enabled:
                self.access_log.log(ex.rid, ex.method, ex.path, ex.status, elapsed)

    async def _send(self, send: Send, ex: Exchange, status: int, body: bytes, headers: Headers,
                    close: bool = False) -> None:
        ex.status, ex.started = status, True
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", b"%d" % len(body)),
                                (b"x-request-id", ex.request_id), *([_CLOSE] if close else [])]})
        await send({"type": "http.response.body",
                    "body": b"" if ex.method == "HEAD" else body})

    async def _pass_on(self, ex: Exchange, receive: Receive, send: Send) -> None:
        """To FastAPI, with the request id added to its answer; a HEAD is its GET, bodiless."""
        head = ex.method == "HEAD"
        scope = {**ex.scope, "method": "GET"} if head else ex.scope

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.status, ex.started = message["status"], True
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"x-request-id", ex.request_id)]}
            elif head:
                message = {**message, "body": b""}
            await send(message)

        await self.api(scope, receive, send_with_id)

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"the request body is larger than the limit of {self.max_body} bytes",
            expected=f"a body of at most {self.max_body} bytes (up to {self.max_batch} examples "
            "per request)",
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

    # ---------------------------------------------------------------- predictions

    async def _infer(self, ex: Exchange, receive: Receive, model: Model | None,
                     codec: Codec) -> Answer:
        """Decode, run, encode: every protocol's predictions take this one path."""
        if model is None:
            raise NotReadyError(self.rt.readiness.reason)
        codec.check_content_type(ex.content_type)
        if ex.content_coding is not None:
            _check_content_coding(ex.content_coding)
        self._check_length(ex.content_length)  # before a single byte of the body is read
        body = await self._read_body(receive)
        decoded = codec.decode(model, body, ex.header_length)
        outputs = await self.plane.infer(model, decoded.x, decoded.single)
        answer, headers = codec.encode(model, outputs, decoded)
        self.plane.answered(model, outputs)
        return 200, answer, headers

    async def _predict(self, ex: Exchange, params: dict[str, str], receive: Receive) -> Answer:
        return await self._infer(ex, receive, self.rt.model, bnserve.SINGLE)

    async def _predict_batch(self, ex: Exchange, params: dict[str, str],
                             receive: Receive) -> Answer:
        return await self._infer(ex, receive, self.rt.model, bnserve.BATCH)

    # ---------------------------------------------------------------- the Open Inference Protocol

    def _v2_served(self, params: dict[str, str]) -> Model | None:
        """The model the path names, if it is this one (404 if not); None while not loaded."""
        name = params["model_name"]
        if name != self.model_name:
            raise NotFoundError(f"model {name!r} is not served here; this server serves "
                                f"{self.model_name!r}",
                                expected=f"GET /v2/models/{self.model_name}")
        model = self.rt.model
        version = params.get("model_version")
        if version is not None and model is not None and version != model.version:
            raise NotFoundError(f"model {name!r} has no version {version!r}; the version "
                                f"served is {model.version!r}",
                                expected=f"/v2/models/{name}/versions/{model.version}, or "
                                f"/v2/models/{name} for whichever version is served")
        return model

    async def _v2_infer(self, ex: Exchange, params: dict[str, str], receive: Receive) -> Answer:
        return await self._infer(ex, receive, self._v2_served(params), self.v2)

    async def _v2_server(self, ex: Exchange, params: dict[str, str], receive: Receive) -> Answer:
        return _json(v2.server_metadata(self.version))

    async def _v2_live(self, ex: Exchange, params: dict[str, str], receive: Receive) -> Answer:
        return _json({"live": True})

    async def _v2_ready(self, ex: Exchange, params: dict[str, str], receive: Receive) -> Answer:
        ready = self.rt.readiness.ready
        return _json({"ready": ready}, 200 if ready else 503)

    async def _v2_model(self, ex: Exchange, params: dict[str, str], receive: Receive) -> Answer:
        model = self._v2_served(params)
        if model is None:
            raise NotReadyError(self.rt.readiness.reason)
        return _json(v2.model_metadata(self.model_name, model))

    async def _v2_model_ready(self, ex: Exchange, params: dict[str, str],
                              receive: Receive) -> Answer:
        ready = self._v2_served(params) is not None and self.rt.readiness.ready
        return _json({"name": self.model_name, "ready": ready}, 200 if ready else 503)
