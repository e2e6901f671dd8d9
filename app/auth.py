"""Bearer-token auth: who may call the prediction routes.

Off unless tokens are configured: ``BNSERVE_API_KEYS`` (comma-separated) and/or
``BNSERVE_API_KEYS_FILE`` (one token per line; blank lines and ``#`` comments ignored), both read
once when the app is built. A set file that cannot be read or holds no token stops the start
(an auth setting that silently turned auth off would be worse). Which routes need a token is
decided in one place, by route (app/service.py ``PROTECTED_ROUTES``), never by the probes,
metrics or docs.

A request must send ``Authorization: Bearer <token>``. Tokens are compared in constant time:
the presented token and every configured one are hashed with SHA-256 (so their lengths do not
matter either) and the digests compared with ``hmac.compare_digest``, against all keys, without
an early exit, so the time taken says nothing about which key matched or how much of one did.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from app.errors import UnauthorizedError
from app.settings import Settings

_SCHEME = b"bearer"


class ApiKeys:
    """The accepted tokens (kept only as SHA-256 digests) and the check of one request."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = tuple(hashlib.sha256(t.encode()).digest() for t in tokens)
        if not self._digests:
            raise ValueError("ApiKeys needs at least one token")

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys | None:
        """The configured tokens, or None when auth is off (neither setting given)."""
        if settings.api_keys is None and settings.api_keys_file is None:
            return None
        tokens = [t.strip() for t in (settings.api_keys or "").split(",") if t.strip()]
        path = settings.api_keys_file
        if path is not None:
            try:
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"BNSERVE_API_KEYS_FILE {path}: cannot read it ({e})") from None
            from_file = [t for t in (ln.strip() for ln in lines) if t and not t.startswith("#")]
            if not from_file:
                raise ValueError(f"BNSERVE_API_KEYS_FILE {path} holds no token (one per line)")
            tokens += from_file
        if not tokens:
            raise ValueError("BNSERVE_API_KEYS is set but holds no token (comma-separated)")
        if any(any(c.isspace() for c in t) for t in tokens):
            raise ValueError("a bearer token must not contain whitespace")
        return cls(tokens)

    def accepts(self, token: bytes) -> bool:
        digest = hashlib.sha256(token).digest()
        ok = False
        for known in self._digests:  # every key, no early exit
            ok |= hmac.compare_digest(known, digest)
        return ok

    def check(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Raise ``UnauthorizedError`` (401) unless the request carries a valid bearer token."""
        value = None
        for key, v in headers:
            if key == b"authorization":
                value = v
                break
        if value is None:
            raise UnauthorizedError("this route needs a bearer token", invalid_token=False)
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != _SCHEME or not self.accepts(token.strip()):
            raise UnauthorizedError("the bearer token is not valid", invalid_token=True)
