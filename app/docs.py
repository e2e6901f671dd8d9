"""``/docs`` with no internet access, and OpenAPI examples taken from the model being served.

Swagger UI: the page FastAPI would write loads Swagger UI's JavaScript and CSS from a CDN, so
behind a firewall it stays blank. bnserve serves Swagger UI 5.35.0 itself, vendored unchanged in
app/static/swagger-ui/ (Apache-2.0; version, origin and sha256 sums in SOURCE.md there): the page
(``page``) loads ``/docs/assets/<file>`` (a fixed set of routes in app/routes.py), and Swagger
UI's validator badge, which would call an outside service, is off. ``Assets.load`` reads the
files once when the app is created and refuses to start without them (a broken install).

Examples: the request examples of ``/predict``, ``/predict/batch`` and the V2 infer routes, and
the path parameters of the ``/v2/models/...`` routes, are those of the model served now
(``with_examples``). ``bnserve-export`` stores a few of the inputs it verified the file on in the
model's metadata (``example_inputs``, with ``example_source`` saying which: the first validation
rows, the first ``--samples``, or the first inputs it generated). A file without them (written
before they existed, or by other tools), or whose ``example_inputs`` do not have the model's input
shape, gets zeros of the input shape instead, and the document says so. An example is left out
when it would not be a valid request here, or too large to read: over ``MAX_EXAMPLE_VALUES``
values, or a body over BNSERVE_MAX_BODY_BYTES (a batch example then has fewer rows, and never more
than BNSERVE_MAX_BATCH).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

from app import routes
from app.predictor import INPUT, ModelInfo

SWAGGER_UI_VERSION = "5.35.0"
STATIC = Path(__file__).parent / "static" / "swagger-ui"
_MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".png": "image/png"}
# The URLs carry the version, so a browser may keep the files: a new version is a new URL.
_CACHE = {"cache-control": "public, max-age=604800", "x-content-type-options": "nosniff"}

EXAMPLES_KEY = "example_inputs"  # metadata written by bnserve-export (model_export/graph.py)
EXAMPLE_SOURCE_KEY = "example_source"
MAX_EXAMPLE_VALUES = 4096  # in one example, as bnserve-export (model_export/graph.py)
BATCH_ROWS = 3


class Assets:
    """Swagger UI's files, read once, answered by their route's path."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self._files = files

    @classmethod
    def load(cls, directory: Path = STATIC) -> Assets:
        files: dict[str, bytes] = {}
        for name in routes.DOCS_FILES:
            try:
                files[routes.DOCS_ASSETS + name] = (directory / name).read_bytes()
            except OSError as e:
                raise RuntimeError(
                    f"Swagger UI's {name} is missing from {directory} ({e.strerror}): a broken "
                    "install (app/static/ is package data); set BNSERVE_DOCS_ENABLED=false to "
                    "serve without /docs") from None
        return cls(files)

    def response(self, path: str) -> Response:
        body = self._files[path]  # the route table lists only files that were loaded
        return Response(body, media_type=_MEDIA_TYPES[Path(path).suffix], headers=_CACHE)


def page(root_path: str, openapi_url: str, title: str) -> HTMLResponse:
    """The Swagger UI page, every URL on this server (``root_path``: behind a path prefix)."""
    base = root_path.rstrip("/")

    def asset(name: str) -> str:
        return f"{base}{routes.DOCS_ASSETS}{name}?v={SWAGGER_UI_VERSION}"

    return get_swagger_ui_html(
        openapi_url=base + openapi_url, title=f"{title} - Swagger UI",
        swagger_js_url=asset("swagger-ui-bundle.js"), swagger_css_url=asset("swagger-ui.css"),
        swagger_favicon_url=asset("favicon-32x32.png"),
        # no badge from the online validator (it would send the document's URL out)
        swagger_ui_parameters={"validatorUrl": None},
    )


# ---------------------------------------------------------------- examples from the model


@dataclass(frozen=True)
class Rows:
    """Example inputs for the served model, each nested lists of its input shape."""

    rows: list[Any]
    stored: bool  # from the model file (else zeros)
    note: str  # where they come from, for the document's description


def example_rows(info: ModelInfo) -> Rows | None:
    """The model file's ``example_inputs`` if they fit its input shape, else zeros; None when
    one example has more than MAX_EXAMPLE_VALUES values."""
    shape = info.input_shape
    if math.prod(shape) > MAX_EXAMPLE_VALUES:
        return None
    raw = info.metadata.get(EXAMPLES_KEY)
    why = "the model file stores no example inputs (example_inputs)"
    if raw is not None:
        rows = _stored(raw, shape)
        if rows is not None:
            source = info.metadata.get(EXAMPLE_SOURCE_KEY) or "stored at export"
            return Rows(rows, True, f"inputs stored in the model file ({source})")
        why = f"the model file's example_inputs are not finite numbers of shape [n, {_dims(shape)}]"
    zeros = np.zeros((2, *shape)).tolist()
    return Rows(zeros, False, f"zeros of the model's input shape: {why}")


def _dims(shape: tuple[int, ...]) -> str:
    return ", ".join(map(str, shape))


def _stored(raw: str, shape: tuple[int, ...]) -> list[Any] | None:
    try:
        x = np.asarray(json.loads(raw), dtype=np.float64)
    except (ValueError, TypeError):  # not JSON, ragged lists, or not numbers
        return None
    with np.errstate(over="ignore"):
        finite = bool(np.isfinite(x.astype(np.float32)).all())
    if x.ndim != len(shape) + 1 or x.shape[1:] != shape or len(x) == 0 or not finite:
        return None
    rows: list[Any] = x.tolist()
    return rows


def _example(summary: str, value: Any) -> dict[str, Any]:
    return {"summary": summary, "value": value}


def _fits(value: Any, max_body: int) -> bool:
    return len(orjson.dumps(value)) <= max_body


def _batch(rows: list[Any], max_batch: int, max_body: int, wrap: Any) -> Any:
    """``wrap(rows[:n])`` for the largest n <= BATCH_ROWS that makes a valid request, or None."""
    for n in range(min(len(rows), BATCH_ROWS, max_batch), 0, -1):
        value = wrap(rows[:n])
        if _fits(value, max_body):
            return value
    return None


def _v2(rows: list[Any]) -> dict[str, Any]:
    data = np.asarray(rows, dtype=np.float64)
    return {"inputs": [{"name": INPUT, "shape": list(data.shape), "datatype": "FP32",
                        "data": data.ravel().tolist()}]}


def request_examples(info: ModelInfo, max_batch: int, max_body: int) -> tuple[
        dict[str, dict[str, Any]], str]:
    """The request body examples by route name (predict, predict_batch, v2_infer), and a sentence
    saying where they come from."""
    found = example_rows(info)
    if found is None:
        return {}, (f"No request examples: one example of this model has "
                    f"{math.prod(info.input_shape)} values (over {MAX_EXAMPLE_VALUES}).")
    what = "stored in the model file" if found.stored else "zeros of the input shape"
    by_route: dict[str, dict[str, Any]] = {"predict": {}, "predict_batch": {}, "v2_infer": {}}
    single = {"features": found.rows[0]}
    if _fits(single, max_body):
        by_route["predict"]["one"] = _example(f"One example ({what})", single)
        if info.feature_names is not None:  # 1-D: the same example, by feature name
            named = {"features": dict(zip(info.feature_names, found.rows[0], strict=True))}
            if _fits(named, max_body):
                by_route["predict"]["by_name"] = _example("The same, by feature name", named)
    batch = _batch(found.rows, max_batch, max_body, lambda r: {"instances": r})
    if batch is not None:
        n = len(batch["instances"])
        by_route["predict_batch"]["batch"] = _example(f"{n} example(s) ({what})", batch)
    one = _v2(found.rows[:1])
    if _fits(one, max_body):
        by_route["v2_infer"]["one"] = _example(
            f"One example as an FP32 [1, {_dims(info.input_shape)}] tensor ({what})", one)
    v2_batch = _batch(found.rows, max_batch, max_body, _v2)
    if v2_batch is not None and v2_batch["inputs"][0]["shape"][0] > 1:
        n = v2_batch["inputs"][0]["shape"][0]
        by_route["v2_infer"]["batch"] = _example(
            f"{n} examples as one FP32 [{n}, {_dims(info.input_shape)}] tensor", v2_batch)
    return by_route, f"The request examples are {found.note}."


def with_examples(base: dict[str, Any], info: ModelInfo | None, model_name: str,
                  max_batch: int, max_body: int) -> dict[str, Any]:
    """The OpenAPI document ``base`` for the model ``info`` (None: not loaded yet, no
    examples): request examples, path parameters, and a description of what is served."""
    doc = copy.deepcopy(base)
    if info is None:
        return doc
    by_route, note = request_examples(info, max_batch, max_body)
    paths = doc["paths"]
    for r in routes.ROUTES:
        op = paths.get(r.template, {}).get(r.method.lower())
        if op is None:
            continue
        examples = by_route.get(r.name)
        if examples:
            op["requestBody"]["content"]["application/json"]["examples"] = examples
        for param in op.get("parameters", ()):
            value = {"model_name": model_name, "model_version": info.model_version}.get(
                param.get("name"))
            if param.get("in") == "path" and value is not None:
                param["example"] = value
    shape = f"[{_dims(info.input_shape)}]"
    classes = info.class_names or []
    named = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    kind = f"a classifier of {len(classes)} classes ({named})" if classes else "a values model"
    doc["info"]["description"] += (
        f"\n\nServed now: model `{model_name}` version `{info.model_version}`, {kind}; one "
        f"example is {shape} float32 values (GET /model for everything about it). {note}")
    return doc
