"""Every route bnserve serves, defined once.

The table below is the one definition that the rest reads: ``Service`` dispatches the routes it
answers itself (``fast``) from it, the FastAPI app registers the others from it, the OpenAPI
document lists all of them, a 404's message lists them, bearer-token auth protects the ones
marked ``protected``, and metrics label requests with their ``template`` (never the raw path:
``/v2/models/default/infer`` counts as ``/v2/models/{model_name}/infer``), except the probes and
the scrape (``observed=False``), which are not counted at all.

The documentation (``/docs``, ``/openapi.json``, and Swagger UI's own files under
``/docs/assets/``: a fixed set, one route each, so a made-up file name is a 404 counted as
``unmatched``) is answered by the FastAPI app, and only when BNSERVE_DOCS_ENABLED is on.

Two protocols: bnserve's own JSON (``/predict``, ``/predict/batch``) and the Open Inference
Protocol's REST binding ("V2", ``/v2/...``: app/v2.py). Their errors differ in shape only
(app/errors.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Protocol = Literal["bnserve", "v2"]


@dataclass(frozen=True)
class Route:
    method: Literal["GET", "POST"]
    template: str
    name: str  # the handler's name: a Service method for fast routes, else a FastAPI endpoint
    summary: str
    protocol: Protocol = "bnserve"
    fast: bool = False  # answered by app.service.Service without FastAPI
    observed: bool = True  # counted in the request metrics
    protected: bool = False  # needs a bearer token when auth is on (app/auth.py)

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.template.strip("/").split("/"))

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


_V2_MODEL = "/v2/models/{model_name}"
_V2_VERSION = "/v2/models/{model_name}/versions/{model_version}"
DOCS_ASSETS = "/docs/assets/"
# Swagger UI's files that /docs loads (vendored in app/static/swagger-ui/, see SOURCE.md there)
DOCS_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")

ROUTES: tuple[Route, ...] = (
    Route("POST", "/predict", "predict", "Predict one example", fast=True, protected=True),
    Route("POST", "/predict/batch", "predict_batch",
          "Predict up to BNSERVE_MAX_BATCH examples in one request", fast=True, protected=True),
    Route("GET", "/model", "model_info", "The model being served: interface, training figures, "
          "file hash, load time, last reload"),
    Route("GET", "/drift", "drift", "Drift monitoring: how what this worker served compares "
          "with the model's own training statistics, worst features and channels first"),
    Route("GET", "/livez", "livez", "200 while the process and its event loop answer",
          observed=False),
    Route("GET", "/readyz", "readyz", "200 once the model is loaded, checked and warm; 503 with "
          "the reason before that and from the moment shutdown begins", observed=False),
    Route("GET", "/metrics", "metrics", "Prometheus text format, aggregated over all workers",
          observed=False),
    Route("GET", "/docs", "docs", "This documentation (Swagger UI, served from here: no CDN)"),
    *(Route("GET", DOCS_ASSETS + name, "docs_asset", f"Swagger UI's {name}, for /docs")
      for name in DOCS_FILES),
    Route("GET", "/openapi.json", "openapi", "The OpenAPI document"),
    # The Open Inference Protocol (app/v2.py): server, health, model metadata and readiness, infer
    Route("GET", "/v2", "v2_server", "Server metadata: name, version, extensions",
          protocol="v2", fast=True),
    Route("GET", "/v2/health/live", "v2_live", "200 {\"live\": true} while the process answers",
          protocol="v2", fast=True, observed=False),
    Route("GET", "/v2/health/ready", "v2_ready", "200 {\"ready\": true} once the model is warm, "
          "else 503 {\"ready\": false}", protocol="v2", fast=True, observed=False),
    Route("GET", _V2_MODEL, "v2_model", "Model metadata: versions, platform, input and outputs",
          protocol="v2", fast=True),
    Route("GET", _V2_VERSION, "v2_model", "Model metadata of one version", protocol="v2",
          fast=True),
    Route("GET", _V2_MODEL + "/ready", "v2_model_ready", "Model readiness", protocol="v2",
          fast=True, observed=False),
    Route("GET", _V2_VERSION + "/ready", "v2_model_ready", "Readiness of one model version",
          protocol="v2", fast=True, observed=False),
    Route("POST", _V2_MODEL + "/infer", "v2_infer", "Inference: JSON, or JSON and binary tensor "
          "data", protocol="v2", fast=True, protected=True),
    Route("POST", _V2_VERSION + "/infer", "v2_infer", "Inference on one model version",
          protocol="v2", fast=True, protected=True),
)

V2_PREFIX = "/v2"
_EXACT: dict[str, list[Route]] = {}
_PATTERNS: dict[int, list[Route]] = {}  # templates with parameters, by number of segments
for _r in ROUTES:
    if "{" in _r.template:
        _PATTERNS.setdefault(len(_r.segments), []).append(_r)
    else:
        _EXACT.setdefault(_r.template, []).append(_r)


@dataclass(frozen=True)
class Match:
    """The routes of one path template (one per method) and the path's parameters."""

    template: str
    routes: tuple[Route, ...]
    params: dict[str, str]

    def route(self, method: str) -> Route | None:
        method = "GET" if method == "HEAD" else method  # HEAD is served wherever GET is
        return next((r for r in self.routes if r.method == method), None)

    @property
    def allowed(self) -> str:
        return ", ".join(sorted({r.method for r in self.routes}
                                | ({"HEAD"} if any(r.method == "GET" for r in self.routes)
                                   else set())))


_MATCHES: dict[str, Match | None] = {}  # paths seen (a few model names), not to match again
_MAX_REMEMBERED = 1024  # a client making up paths gets no more memory than this


def match(path: str) -> Match | None:
    """The template ``path`` belongs to, or None. Parameters are single, non-empty segments.
    A ``Match`` is shared by every request for its path: read it, never change it."""
    try:
        return _MATCHES[path]
    except KeyError:
        pass
    found = _match(path)
    if len(_MATCHES) >= _MAX_REMEMBERED:
        _MATCHES.clear()
    _MATCHES[path] = found
    return found


def _match(path: str) -> Match | None:
    exact = _EXACT.get(path)
    if exact is not None:
        return Match(path, tuple(exact), {})
    if not path.startswith(V2_PREFIX + "/"):
        return None
    segments = path[1:].split("/")
    candidates = _PATTERNS.get(len(segments), [])
    for r in candidates:
        params = _bind(r.segments, segments)
        if params is not None:
            same = tuple(c for c in candidates if c.template == r.template)
            return Match(r.template, same, params)
    return None


def _bind(template: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    params: dict[str, str] = {}
    for t, s in zip(template, segments, strict=True):
        if t.startswith("{"):
            if not s:
                return None
            params[t[1:-1]] = s
        elif t != s:
            return None
    return params


def listing() -> str:
    """Every route, for a 404's message."""
    return ", ".join(map(str, ROUTES))
