"""The app: ``create_app(settings)`` for tests and embedding, ``create_app_from_env`` for uvicorn.

The FastAPI app serves health, model metadata, metrics and docs, and runs the lifespan (model
loading). It sits behind ``Service`` (app/service.py), which answers the two predict routes itself
and wraps every request with request ids, limits, metrics and access logs.
"""

from __future__ import annotations

import signal
import threading
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import onnxruntime as ort
import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import logs, schemas
from app.errors import INTERNAL_ERROR_MESSAGE, NotReadyError, ServiceError, error_body
from app.lifecycle import lifespan
from app.predictor import ModelInfo
from app.service import PREDICT, PREDICT_BATCH, REQUEST_ID_KEY, Service
from app.settings import Settings
from app.state import Runtime

try:
    __version__ = version("bnserve")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

ROUTES = ("POST /predict", "POST /predict/batch", "GET /model", "GET /livez", "GET /readyz",
          "GET /metrics", "GET /docs")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse, "description": text} for code, text in {
        400: "Empty or non-JSON body.",
        413: "Body over BNSERVE_MAX_BODY_BYTES, or more than BNSERVE_MAX_BATCH instances.",
        415: "Content-Type is not application/json.",
        422: "The JSON is not a valid request: the message says what is wrong.",
        503: "The model is not loaded yet (see GET /readyz).",
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


def model_details(doc: dict[str, Any], info: ModelInfo) -> None:
    """What GET /model adds with BNSERVE_EXPOSE_DETAILS=true: where the file is on this machine
    and which ONNX Runtime runs it (useful to an operator, a map to an attacker)."""
    doc["file"]["path"] = info.path
    doc["runtime"].update(onnxruntime=ort.__version__, providers=["CPUExecutionProvider"])


def _add_routes(api: FastAPI, rt: Runtime) -> None:
    @api.get("/livez", response_model=schemas.Liveness, tags=["health"],
             summary="200 while the process and its event loop answer")
    async def livez() -> Response:
        return _json({"status": "alive"})

    @api.get("/readyz", response_model=schemas.Readiness, tags=["health"],
             summary="200 once the model is loaded, checked and warm; 503 with the reason before "
             "that and from the moment shutdown begins",
             responses={503: {"model": schemas.Readiness, "description": "Not ready."}})
    async def readyz() -> Response:
        r, model = rt.readiness, rt.model
        doc = {"ready": r.ready, "reason": r.reason,
               "model_version": model.version if model else None}
        return _json(doc, 200 if r.ready else 503)

    @api.get("/model", response_model=schemas.ModelInfo, tags=["model"],
             summary="The model being served: interface, training figures, file hash, load time, "
             "last reload",
             responses={503: _ERRORS[503]})
    async def model_info() -> Response:
        model = rt.model
        if model is None:
            raise NotReadyError(rt.readiness.reason)
        info = model.predictor.info
        doc = model_document(info)
        if rt.settings.expose_details:
            model_details(doc, info)
        doc["last_reload"] = None if rt.last_reload is None else rt.last_reload.as_dict()
        return _json(doc)

    @api.get("/metrics", tags=["health"], response_class=Response,
             summary="Prometheus text format, aggregated over all workers",
             responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        return Response(rt.metrics.render(), media_type=rt.metrics.content_type)


def _add_error_handlers(api: FastAPI) -> None:
    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        body = error_body(exc.message, _request_id(request), exc.expected)
        return Response(body, exc.status_code, exc.headers, media_type="application/json")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        method, path = request.method, request.url.path
        if exc.status_code == 404:
            message, expected = f"no route {path}", "one of: " + ", ".join(ROUTES)
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


# Documentation only: these handlers never run (Service answers the two routes before FastAPI
# sees them); the router is not mounted, FastAPI just reads the signatures for the schema.
_predict_docs = APIRouter(tags=["predict"])
_DOCS_ONLY = "documents the route for OpenAPI; app.service.Service answers it"


# The answer's shape depends on the model's output_kind (GET /model): a class or raw values.
@_predict_docs.post(PREDICT, response_model=schemas.Prediction | schemas.ValuesPrediction,
                    responses=_ERRORS, summary="Predict one example")
async def _predict(body: schemas.PredictRequest) -> schemas.Prediction:
    raise RuntimeError(_DOCS_ONLY)


@_predict_docs.post(
    PREDICT_BATCH, response_model=schemas.BatchPrediction | schemas.ValuesBatchPrediction,
    responses=_ERRORS, summary="Predict up to BNSERVE_MAX_BATCH examples in one request",
)
async def _predict_batch(body: schemas.BatchRequest) -> schemas.BatchPrediction:
    raise RuntimeError(_DOCS_ONLY)


def create_app(settings: Settings) -> Service:
    """The whole service as an ASGI app. It loads the model when its lifespan starts."""
    rt = Runtime(settings)
    docs = settings.docs_enabled
    api = FastAPI(
        title="bnserve",
        version=__version__,
        description="Single-example predictions from a batch-norm network exported to ONNX "
        "(bnserve-export): a classifier or a values model, examples of any fixed shape.",
        lifespan=lifespan(rt),
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    _add_routes(api, rt)
    _add_error_handlers(api)

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = get_openapi(
                title=api.title, version=api.version, description=api.description,
                routes=[*_predict_docs.routes, *api.routes],
            )
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return Service(api, rt)


def create_app_from_env() -> Service:
    """uvicorn's factory (``app.main:create_app_from_env``): settings and logging from env."""
    if threading.current_thread() is threading.main_thread():
        # A worker process starts with SIGHUP's default action (exit); until its lifespan
        # handles it (a model reload), a SIGHUP forwarded by the supervisor is ignored.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = Settings()
    logs.configure(settings.log_level, settings.log_format)
    return create_app(settings)
