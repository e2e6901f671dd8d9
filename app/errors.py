"""Client-facing errors, and how they look on the wire, per protocol, decided here only.

    bnserve  {"error": {"message": "...", "expected": "...", "request_id": "..."}}
    V2       {"error": "<message> (expected: ...)"}   (the Open Inference Protocol's shape)

V2 answers a request it cannot read (``BadInputError``, bnserve's 422) with 400, as its spec and
Triton do; every other status is the same in both protocols. The request id travels in the
``X-Request-ID`` header either way.

``expected`` is present when there is something useful to say about what a valid request looks
like. Internal errors never leak details: their message is generic and the request id links the
answer to the logged traceback.
"""

from __future__ import annotations

import orjson

INTERNAL_ERROR_MESSAGE = "internal server error; the request id identifies it in the server logs"

# What the HTTP protocol (app/protocol.py) and the ASGI service (app/service.py) tell each other
# about a request, in its ASGI scope: the request id the service chose (so an answer the protocol
# writes itself carries it), and that the protocol answered 408 because the body stopped coming.
REQUEST_ID_KEY = "bnserve.request_id"
TIMED_OUT_KEY = "bnserve.timed_out"


class ServiceError(Exception):
    """An error the client can act on; answered with ``status_code`` and the error shape."""

    status_code = 500

    def __init__(
        self,
        message: str,
        *,
        expected: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.expected = expected
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers or {}


class BadInputError(ServiceError):
    """The body parsed but is not a valid request (wrong shape, type or value)."""

    status_code = 422


class MalformedBodyError(BadInputError):
    """The body is empty or not JSON at all."""

    status_code = 400


class PayloadTooLargeError(ServiceError):
    status_code = 413


class UnsupportedMediaTypeError(ServiceError):
    status_code = 415


class UnauthorizedError(ServiceError):
    """No bearer token, or not one of the configured ones (app/auth.py)."""

    status_code = 401

    def __init__(self, message: str, *, invalid_token: bool) -> None:
        challenge = 'Bearer realm="bnserve"' + (', error="invalid_token"' if invalid_token else "")
        super().__init__(
            message, expected="an 'Authorization: Bearer <token>' header with a valid token",
            headers={"www-authenticate": challenge},
        )


class UnsupportedTransferCodingError(ServiceError):
    """A Transfer-Encoding other than chunked (RFC 9112: 501, and the framing cannot be trusted)."""

    status_code = 501


class MethodNotAllowedError(ServiceError):
    status_code = 405

    def __init__(self, method: str, path: str, allowed: str) -> None:
        super().__init__(
            f"method {method} is not allowed on {path}",
            expected=" or ".join(f"{m.strip()} {path}" for m in allowed.split(",")),
            headers={"allow": allowed},
        )


class NotReadyError(ServiceError):
    status_code = 503

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"the model is not ready: {reason}",
            expected="retry once GET /readyz answers 200",
            headers={"retry-after": "1"},
        )


def error_body(message: str, request_id: str, expected: str | None = None) -> bytes:
    err: dict[str, str] = {"message": message}
    if expected is not None:
        err["expected"] = expected
    err["request_id"] = request_id
    return orjson.dumps({"error": err})


def render(protocol: str, e: ServiceError, request_id: str) -> tuple[int, bytes]:
    """(status, body) of ``e`` in ``protocol`` (app/routes.py ``Route.protocol``)."""
    if protocol == "v2":
        message = e.message if e.expected is None else f"{e.message} (expected: {e.expected})"
        status = 400 if isinstance(e, BadInputError) else e.status_code
        return status, orjson.dumps({"error": message})
    return e.status_code, error_body(e.message, request_id, e.expected)
