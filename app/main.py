"""The app: ``create_app(settings)`` for tests and embedding, ``create_app_from_env`` for uvicorn.

The FastAPI app serves health, model metadata, metrics and docs (Swagger UI from bnserve itself,
examples from the model served: app/docs.py), and runs the lifespan (model loading). It sits
behind ``Service`` (app/service.py), which answers the fast routes itself (predictions, and the
Open Inference Protocol's) and wraps every request with request ids, limits, metrics and access
logs. Both take their routes from the one table in app/routes.py.
"""

from __future__ import annotations

import inspect
import os
import signal
import threading
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import onnxruntime as ort
import orjson
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import docs, logs, routes, schemas
from app.errors import INTERNAL_ERROR_MESSAGE, NotReadyError, ServiceError, error_body, render
from app.lifecycle import lifespan
from app.predictor import ModelInfo
from app.service import REQUEST_ID_KEY, Service
from app.settings import Settings
from app.state import Runtime

try:
    __version__ = version("bnserve")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse, "description": text} for code, text in {
        400: "Empty or non-JSON body.",
        413: "Body over BNSERVE_MAX_BODY_BYTES, or more than BNSERVE_MAX_BATCH instances.",
        415: "Content-Type is not application/json.",
        422: "The JSON is not a valid request: the message says what is wrong.",
        503: "The model is not loaded yet (see GET /readyz).",
    }.items()
}
_V2_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.V2Error, "description": text} for code, text in {
        400: "Not a valid inference request: the message names the input and the position.",
        404: "No such model, or no such version of it.",
        413: "Body over BNSERVE_MAX_BODY_BYTES, or more than BNSERVE_MAX_BATCH examples.",
        415: "A Content-Type other than none, application/json or application/octet-stream.",
        503: "The model is not loaded yet (see GET /v2/health/ready).",
    }.items()
}


def _json(data: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code, headers, media_type="application/json")


def _request_id(request: Request) -> str:
    rid: str = request.scope.get(REQUEST_ID_KEY, "")
    return rid


def model_document(info: ModelInfo) -> dict[str, Any]:
    """GET /model without file-system paths or library versions (see ``model_details``)."""
    p = info.parsed
    inp = info.inputs[0]
    features, classes = info.feature_names, info.class_names
    return {
        "model_version": info.model_version,
        "format": p.get("format"),
        "output_kind": info.output_kind,
        "input_shape": list(info.input_shape),
        "feature_names": features,
        "class_names": classes,
        "n_features": None if features is None else len(features),
        "n_classes": None if classes is None else len(classes),
        "input": inp.as_dict(),
        "outputs": [o.as_dict() for o in info.outputs],
        "fold_report": info.fold_report,
        "source": info.source,
        "estimator": p.get("estimator"),
        "eps": p.get("eps"),
        "beta_avg": p.get("beta_avg"),
        "averaging": p.get("averaging"),
        "folded": p.get("folded"),
        "hidden": p.get("hidden"),
        "opset": p.get("opset"),
        "training": {k: p.get(k) for k in ("train_accuracy", "val_accuracy", "n_train", "n_val",
                                           "data_sha256", "data_source")},
        "file": {"sha256": info.sha256, "size_bytes": info.size_bytes},
        "loaded_at": info.loaded_at,
        "load_seconds": info.load_seconds,
        "warm_up_seconds": info.warm_up_seconds,
        "runtime": {"intra_op_threads": info.intra_op_threads,
                    "inter_op_threads": info.inter_op_threads},
        "metadata": info.metadata,
    }


def drift_document(rt: Runtime, top: int) -> dict[str, Any]:
    """GET /drift for the served model. Not watched (off, or no reference): 200 with
    ``monitoring: false`` and the reason, since a service without a monitor is a state, not an
    error. Each worker answers with its own estimate (of the requests it served)."""
    model = rt.model
    if model is None:
        raise NotReadyError(rt.readiness.reason)
    doc: dict[str, Any] = {"model_version": model.version}
    report = rt.publish_drift()
    if report is None:
        reason = ("drift monitoring is off (BNSERVE_DRIFT=false)" if not rt.settings.drift else
                  "the model carries no drift_reference metadata (re-export it with a "
                  "bnserve-export that writes one)")
        return {**doc, "monitoring": False, "reason": reason}
    s = rt.settings
    return {**doc, "monitoring": True, "worker_pid": os.getpid(),
            "min_examples": s.drift_min_examples, **report.as_dict(top),
            # in served examples (the setting); the monitor's own is in watched examples
            "time_constant": s.drift_time_constant, "sample_every": s.drift_sample_every}


def model_details(doc: dict[str, Any], info: ModelInfo) -> None:
    """What GET /model adds with BNSERVE_EXPOSE_DETAILS=true: where the file is on this machine
    and which ONNX Runtime runs it (useful to an operator, a map to an attacker)."""
    doc["file"]["path"] = info.path
    doc["runtime"].update(onnxruntime=ort.__version__, providers=["CPUExecutionProvider"])


def _add_routes(api: FastAPI, rt: Runtime, assets: docs.Assets | None) -> None:
    async def livez() -> Response:
        return _json({"status": "alive"})

    async def readyz() -> Response:
        r, model = rt.readiness, rt.model
        doc = {"ready": r.ready, "reason": r.reason,
               "model_version": model.version if model else None}
        return _json(doc, 200 if r.ready else 503)

    async def model_info() -> Response:
        model = rt.model
        if model is None:
            raise NotReadyError(rt.readiness.reason)
        info = model.predictor.info
        doc = model_document(info)
        if rt.settings.expose_details:
            model_details(doc, info)
        doc["drift"] = info.drift_document(
            rt.settings.drift_time_constant if model.drift is not None else None,
            rt.settings.drift_sample_every)
        doc["last_reload"] = None if rt.last_reload is None else rt.last_reload.as_dict()
        return _json(doc)

    async def drift(top: int = Query(5, ge=1, le=100, description="Channels listed per "
                                     "group, the worst first.")) -> Response:
        return _json(drift_document(rt, top))

    async def metrics() -> Response:
        rt.publish_drift()  # this worker's latest estimate (others wrote theirs within ~1 s)
        return Response(rt.metrics.render(), media_type=rt.metrics.content_type)

    async def docs_page(request: Request) -> Response:
        return docs.page(request.scope.get("root_path", ""), api.openapi_url or "", api.title)

    async def docs_asset(request: Request) -> Response:
        assert assets is not None
        return assets.response(request.scope["route"].path)  # the template: one of the files

    endpoints: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
        "livez": (livez, {"response_model": schemas.Liveness, "tags": ["health"]}),
        "readyz": (readyz, {"response_model": schemas.Readiness, "tags": ["health"],
                            "responses": {503: {"model": schemas.Readiness,
                                                "description": "Not ready."}}}),
        "model_info": (model_info, {"response_model": schemas.ModelInfo, "tags": ["model"],
                                    "responses": {503: _ERRORS[503]}}),
        "drift": (drift, {"response_model": schemas.Drift, "tags": ["model"],
                          "responses": {503: _ERRORS[503]}}),
        "metrics": (metrics, {"tags": ["health"], "response_class": Response,
                              "responses": {200: {"content": {"text/plain": {}}}}}),
        # not in the OpenAPI document, as FastAPI's own docs_url is not
        "docs": (docs_page, {"include_in_schema": False}),
        "docs_asset": (docs_asset, {"include_in_schema": False}),
    }
    for r in routes.ROUTES:
        if r.fast or r.name in _FASTAPI_OWN or (r.name in _DOCS and assets is None):
            continue
        endpoint, extra = endpoints[r.name]  # a KeyError here: a route without its handler
        api.add_api_route(r.template, endpoint, methods=[r.method], summary=r.summary, **extra)


_FASTAPI_OWN = frozenset({"openapi"})  # FastAPI's openapi_url
_DOCS = frozenset({"docs", "docs_asset"})  # only with BNSERVE_DOCS_ENABLED


def _add_error_handlers(api: FastAPI) -> None:
    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        status, body = render("bnserve", exc, _request_id(request))
        return Response(body, status, exc.headers, media_type="application/json")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        method, path = request.method, request.url.path
        if exc.status_code == 404:
            message, expected = f"no route {path}", "one of: " + routes.listing()
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message, expected = f"method {method} is not allowed on {path}", f"{allowed} {path}"
        else:
            message, expected = str(exc.detail), None
        body = error_body(message, _request_id(request), expected)
        return Response(body, exc.status_code, exc.headers, media_type="application/json")

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        message = f"invalid request: {first.get('msg', 'validation failed')} at {first.get('loc')}"
        return Response(error_body(message, _request_id(request)), 422,
                        media_type="application/json")

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Logged (with the traceback) by Service, which sees the exception re-raised.
        return Response(error_body(INTERNAL_ERROR_MESSAGE, _request_id(request)), 500,
                        media_type="application/json")

    api.add_exception_handler(ServiceError, service_error)
    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(Exception, internal_error)


# Documentation only: the fast routes' request and answer models. Their endpoints never run
# (Service answers these routes before FastAPI sees them); FastAPI just reads the signatures.
_FAST_DOCS: dict[str, tuple[type[Any] | None, Any, list[str], dict[int | str, dict[str, Any]]]] = {
    # The answer's shape depends on the model's output_kind (GET /model): a class or raw values.
    "predict": (schemas.PredictRequest, schemas.Prediction | schemas.ValuesPrediction,
                ["predict"], _ERRORS),
    "predict_batch": (schemas.BatchRequest,
                      schemas.BatchPrediction | schemas.ValuesBatchPrediction, ["predict"],
                      _ERRORS),
    "v2_server": (None, schemas.V2ServerMetadata, ["v2"], {}),
    "v2_live": (None, schemas.V2Live, ["v2"], {}),
    "v2_ready": (None, schemas.V2Ready, ["v2"], {503: {"model": schemas.V2Ready,
                                                       "description": "Not ready."}}),
    "v2_model": (None, schemas.V2ModelMetadata, ["v2"],
                 {k: _V2_ERRORS[k] for k in (404, 503)}),
    "v2_model_ready": (None, schemas.V2ModelReady, ["v2"],
                       {404: _V2_ERRORS[404], 503: {"model": schemas.V2ModelReady,
                                                    "description": "Not ready."}}),
    "v2_infer": (schemas.V2InferRequest, schemas.V2InferResponse, ["v2"], _V2_ERRORS),
}


def _docs_router() -> APIRouter:
    router = APIRouter()
    for r in routes.ROUTES:
        if not r.fast:
            continue
        body, answer, tags, errors = _FAST_DOCS[r.name]

        async def endpoint(**kwargs: Any) -> None:
            raise RuntimeError("documents the route for OpenAPI; app.service.Service answers it")

        params = [inspect.Parameter(p.strip("{}"), inspect.Parameter.KEYWORD_ONLY,
                                    annotation=str) for p in r.segments if p.startswith("{")]
        if body is not None:
            params.append(inspect.Parameter("body", inspect.Parameter.KEYWORD_ONLY,
                                            annotation=body))
        endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        endpoint.__name__ = r.name  # FastAPI makes the operation id from it and the path
        router.add_api_route(r.template, endpoint, methods=[r.method], summary=r.summary,
                             response_model=answer, tags=list(tags), responses=errors)
    return router


def create_app(settings: Settings) -> Service:
    """The whole service as an ASGI app. It loads the model when its lifespan starts."""
    rt = Runtime(settings)
    docs_on = settings.docs_enabled
    api = FastAPI(
        title="bnserve",
        version=__version__,
        description="Single-example predictions from a batch-norm network exported to ONNX "
        "(bnserve-export): a classifier or a values model, examples of any fixed shape.",
        lifespan=lifespan(rt),
        docs_url=None,  # our own /docs (app/docs.py): Swagger UI from here, not from a CDN
        redoc_url=None,
        openapi_url="/openapi.json" if docs_on else None,
        redirect_slashes=False,  # /model/ is a 404 listing the routes, like /predict/, not a 307
    )
    _add_routes(api, rt, docs.Assets.load() if docs_on else None)
    _add_error_handlers(api)
    service = Service(api, rt, __version__)
    base: dict[str, Any] = {}
    # which model the cached document's examples are for (not the model itself: a reference
    # would keep a replaced model's session alive)
    built_for: list[tuple[str, str, str] | None] = [None]

    def openapi() -> dict[str, Any]:
        """The document for the model served now: built once, its examples again whenever
        the model changes (a hot reload may bring another input shape)."""
        if not base:
            base.update(get_openapi(
                title=api.title, version=api.version, description=api.description,
                routes=[*_docs_router().routes, *api.routes],
            ))
        model = rt.model
        info = None if model is None else model.predictor.info
        key = None if info is None else (info.model_version, info.sha256, info.loaded_at)
        if api.openapi_schema is None or built_for[0] != key:
            s = rt.settings
            api.openapi_schema = docs.with_examples(base, info, service.model_name, s.max_batch,
                                                    s.max_body_bytes)
            built_for[0] = key
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return service


def create_app_from_env() -> Service:
    """uvicorn's factory (``app.main:create_app_from_env``): settings and logging from env."""
    if threading.current_thread() is threading.main_thread():
        # A worker process starts with SIGHUP's default action (exit); until its lifespan
        # handles it (a model reload), a SIGHUP forwarded by the supervisor is ignored.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = Settings()
    logs.configure(settings.log_level, settings.log_format)
    return create_app(settings)
