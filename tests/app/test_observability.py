"""Metrics count exactly what was sent; internal errors are generic 500s with a logged traceback;
GET /model describes the file; the OpenAPI docs document the real request and response shapes."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
from collections import Counter
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app import main as app_main
from app import schemas
from app.errors import INTERNAL_ERROR_MESSAGE
from app.logs import AccessLog, JsonFormatter, TextFormatter

ROW = [float(v) for v in np.linspace(0.5, 30.5, 30)]


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_exactly_what_was_sent(client: TestClient, trained: Any) -> None:
    rows = [[float(v) for v in row] for row in trained.x_val[:20]]
    classes: Counter[str] = Counter()
    for row in rows:
        classes[client.post("/predict", json={"features": row}).json()["class"]] += 1
    batch = client.post("/predict/batch", json={"instances": rows[:7]}).json()
    classes.update(p["class"] for p in batch["predictions"])
    for _ in range(3):
        assert client.post("/predict", json={"features": ROW[:5]}).status_code == 422
    assert client.post("/predict", content=b"{}", headers={}).status_code == 415
    assert client.get("/nope").status_code == 404
    assert client.get("/nope/again").status_code == 404
    assert client.get("/predict").status_code == 405
    assert client.get("/model").status_code == 200
    for _ in range(4):  # health and metrics are not counted
        client.get("/livez")
        client.get("/readyz")
        client.get("/metrics")

    m = scrape(client)
    requests = {labels: v for (name, labels), v in m.items() if name == "bnserve_requests_total"}
    assert requests == {
        (("route", "/predict"), ("status", "200")): 20,
        (("route", "/predict/batch"), ("status", "200")): 1,
        (("route", "/predict"), ("status", "422")): 3,
        (("route", "/predict"), ("status", "415")): 1,
        (("route", "unmatched"), ("status", "404")): 2,
        (("route", "/predict"), ("status", "405")): 1,
        (("route", "/model"), ("status", "200")): 1,
    }
    for c in trained.class_names:
        assert value(m, "bnserve_predictions_total", **{"class": c}) == classes[c]
    assert sum(classes.values()) == 27
    assert value(m, "bnserve_request_duration_seconds_count", route="/predict") == 25
    assert value(m, "bnserve_request_duration_seconds_count", route="/predict/batch") == 1
    assert value(m, "bnserve_request_duration_seconds_count", route="/livez") == 0
    assert value(m, "bnserve_inference_duration_seconds_count") == 21  # one run per request
    assert value(m, "bnserve_requests_in_flight") == 0
    info = [labels for (name, labels), v in m.items() if name == "bnserve_model_info" and v == 1]
    assert len(info) == 1
    assert dict(info[0])["model_version"] == trained.model_version
    assert dict(info[0])["sha256"] == hashlib.sha256(trained.model_bytes).hexdigest()


def test_internal_error_is_generic_500_with_request_id_and_logged_traceback(
    client: TestClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor = client.app.rt.model.predictor  # type: ignore[attr-defined]

    def broken(x: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(predictor, "predict", broken)
    monkeypatch.setattr(predictor, "run_watched", broken)  # drift monitoring's run
    caplog.set_level(logging.ERROR, logger="bnserve")
    r = client.post("/predict", json={"features": ROW}, headers={"x-request-id": "req-500"})
    assert r.status_code == 500
    assert r.json() == {"error": {"message": INTERNAL_ERROR_MESSAGE, "request_id": "req-500"}}
    assert "secret" not in r.text
    [record] = caplog.records
    assert record.fields == {"request_id": "req-500"}  # type: ignore[attr-defined]
    assert record.exc_info is not None
    assert "secret internal detail" in caplog.text  # the traceback is in the log

    monkeypatch.undo()
    assert client.post("/predict", json={"features": ROW}).status_code == 200
    m = scrape(client)
    assert value(m, "bnserve_requests_total", route="/predict", status="500") == 1


def test_internal_error_in_a_fastapi_route_has_the_same_shape(
    client: TestClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(info: Any) -> Any:
        raise KeyError("oops")

    monkeypatch.setattr(app_main, "model_document", broken)
    caplog.set_level(logging.ERROR, logger="bnserve")
    r = client.get("/model", headers={"x-request-id": "m-1"})
    assert r.status_code == 500
    assert r.json() == {"error": {"message": INTERNAL_ERROR_MESSAGE, "request_id": "m-1"}}
    assert r.headers["x-request-id"] == "m-1"
    assert len(caplog.records) == 1  # logged once, with the traceback
    assert "KeyError" in caplog.text
    monkeypatch.undo()
    assert client.get("/model").status_code == 200


def test_model_endpoint_describes_the_file(client: TestClient, trained: Any) -> None:
    r = client.get("/model")
    assert r.status_code == 200
    doc = schemas.ModelInfo.model_validate(r.json())
    meta = trained.result.meta
    assert doc.model_version == trained.model_version
    assert doc.format == "bnserve-onnx/1"
    assert doc.feature_names == trained.feature_names
    assert doc.class_names == trained.class_names
    assert (doc.n_features, doc.n_classes) == (30, 2)
    assert doc.input.model_dump() == {"name": "features", "dtype": "float32", "shape": ["N", 30]}
    assert [o.model_dump() for o in doc.outputs] == [
        {"name": "probabilities", "dtype": "float32", "shape": ["N", 2]},
        {"name": "label", "dtype": "int64", "shape": ["N"]},
    ]
    assert doc.estimator == trained.result.net.estimator
    assert doc.eps == trained.result.net.eps
    assert doc.folded is True
    assert doc.hidden == [32, 16]
    assert doc.training.val_accuracy == meta["figures"]["val_accuracy"]
    assert doc.training.n_train == meta["figures"]["n_train"]
    assert doc.training.data_sha256 == meta["data_sha256"]
    assert doc.file.sha256 == hashlib.sha256(trained.model_bytes).hexdigest()
    assert doc.file.size_bytes == len(trained.model_bytes)
    assert doc.loaded_at.endswith("+00:00")
    assert doc.load_seconds > 0
    assert doc.runtime.intra_op_threads >= 1
    assert doc.metadata["format"] == "bnserve-onnx/1"


def test_openapi_documents_the_fast_routes_truthfully(client: TestClient, trained: Any) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) >= {"/predict", "/predict/batch", "/model", "/livez", "/readyz", "/metrics"}
    predict = paths["/predict"]["post"]
    ref = predict["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/PredictRequest")
    ok = predict["responses"]["200"]["content"]["application/json"]["schema"]["anyOf"]
    assert [r["$ref"].rsplit("/", 1)[1] for r in ok] == ["Prediction", "ValuesPrediction"]
    assert set(predict["responses"]) == {"200", "400", "413", "415", "422", "503"}
    schemas_ = spec["components"]["schemas"]
    assert set(schemas_["Prediction"]["properties"]) == {
        "class", "class_index", "probabilities", "model_version"}
    assert set(schemas_["ValuesPrediction"]["properties"]) == {"values", "model_version"}
    batch = paths["/predict/batch"]["post"]
    assert batch["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/BatchRequest")
    ok = batch["responses"]["200"]["content"]["application/json"]["schema"]["anyOf"]
    assert [r["$ref"].rsplit("/", 1)[1] for r in ok] == ["BatchPrediction",
                                                         "ValuesBatchPrediction"]

    # the documented example is a real, valid request (the served model's: tests/app/test_docs.py)
    example = predict["requestBody"]["content"]["application/json"]["examples"]["one"]["value"]
    r = client.post("/predict", json=example)
    assert r.status_code == 200
    schemas.Prediction.model_validate(r.json())
    assert client.get("/docs").status_code == 200
    health = client.get("/livez").json()
    schemas.Liveness.model_validate(health)


def test_docs_can_be_turned_off(make_client: Any) -> None:
    client = make_client(docs_enabled=False)
    for path in ("/docs", "/openapi.json"):
        r = client.get(path)
        assert r.status_code == 404
        assert "no route" in r.json()["error"]["message"]
    assert client.post("/predict", json={"features": ROW}).status_code == 200


def test_access_log_has_one_line_per_request_with_id_status_and_latency(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = io.StringIO()
    client = make_client(log_format="json")  # the default, auto, would be text on a terminal
    log = client.app.access_log
    monkeypatch.setattr(log, "_stream", sink)
    client.post("/predict", json={"features": ROW}, headers={"x-request-id": "a-1"})
    client.post("/predict", json={"features": ROW[:3]}, headers={"x-request-id": "a-2"})
    client.get("/nope", headers={"x-request-id": "a-3"})
    client.get("/livez", headers={"x-request-id": "a-4"})
    log.flush()
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert [(x["request_id"], x["method"], x["path"], x["status"]) for x in lines] == [
        ("a-1", "POST", "/predict", 200), ("a-2", "POST", "/predict", 422),
        ("a-3", "GET", "/nope", 404), ("a-4", "GET", "/livez", 200),
    ]
    for x in lines:
        assert x["logger"] == "bnserve.access"
        assert x["level"] == "info"
        assert 0 < x["latency_ms"] < 10_000
        assert x["ts"].endswith("Z")


def test_text_log_format_keeps_one_line_per_request() -> None:
    sink = io.StringIO()
    log = AccessLog("info", "text", stream=sink)
    log.log("r-1", "GET", "/a b\nfake line", 404, 0.0012)
    assert AccessLog("warning", "text").enabled is False
    [line] = sink.getvalue().splitlines()
    assert line.endswith('bnserve.access GET "/a b\\nfake line" 404 request_id=r-1 '
                         "latency_ms=1.2")


def test_json_access_lines_are_the_objects_orjson_writes_escapes_included() -> None:
    sink = io.StringIO()
    log = AccessLog("info", "json", stream=sink)
    cases = [("r-1", "POST", "/predict", 200, 0.000_499), ('q"x\\y', "GET", '/a b\n"c', 404, 1.5),
             *[(f"r{i}", "GET", f"/p{i}", 404, 0.001) for i in range(300)]]  # past the cache
    for rid, method, path, status, seconds in cases:
        log.log(rid, method, path, status, seconds)
    log.flush()
    lines = sink.getvalue().splitlines()
    assert len(lines) == len(cases)
    for line, (rid, method, path, status, seconds) in zip(lines, cases, strict=True):
        doc = json.loads(line)
        assert list(doc) == ["ts", "level", "logger", "pid", "msg", "request_id", "method",
                             "path", "status", "latency_ms"]
        assert doc | {"ts": None} == {
            "ts": None, "level": "info", "logger": "bnserve.access", "pid": os.getpid(),
            "msg": f"{method} {path} {status}", "request_id": rid, "method": method,
            "path": path, "status": status, "latency_ms": round(seconds * 1000, 3)}
    assert len(log._middles) <= 256


def test_formatters_write_fields_and_tracebacks() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        record = logging.LogRecord("bnserve.x", logging.ERROR, __file__, 1, "failed %s", ("it",),
                                   exc_info=sys.exc_info())
    record.fields = {"request_id": "r-9"}
    doc = json.loads(JsonFormatter().format(record))
    assert doc["msg"] == "failed it"
    assert doc["level"] == "error"
    assert doc["request_id"] == "r-9"
    assert "ValueError: bad" in doc["exc"]
    text = TextFormatter().format(record)
    assert text.splitlines()[0].endswith("ERROR   bnserve.x failed it request_id=r-9")
    assert "ValueError: bad" in text
