"""Every bad request gets a clear 4xx in the one error shape, and the service keeps serving."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import schemas
from app.main import create_app
from app.settings import Settings

N = 30  # features of the default model
ROW = [float(v) for v in np.linspace(0.5, 30.5, N)]  # any finite row is a valid input


def _body(features: Any) -> bytes:
    return json.dumps({"features": features}).encode()  # json allows NaN/Infinity; orjson not


def _with(index: int, value: Any) -> list[Any]:
    row: list[Any] = list(ROW)
    row[index] = value
    return row


JSON = {"content-type": "application/json"}

# (id, method, path, body, headers, status, words the message must contain)
CASES: list[tuple[str, str, str, bytes | None, dict[str, str], int, list[str]]] = [
    ("too few features", "POST", "/predict", _body(ROW[:-1]), JSON, 422,
     ["expected 30 feature values, got 29"]),
    ("too many features", "POST", "/predict", _body([*ROW, 1.0]), JSON, 422,
     ["expected 30 feature values, got 31"]),
    ("no features", "POST", "/predict", _body([]), JSON, 422, ["got 0"]),
    ("NaN", "POST", "/predict", _body(_with(4, float("nan"))), JSON, 422,
     ["'smoothness_mean'", "index 4", "NaN"]),
    ("Infinity", "POST", "/predict", _body(_with(0, float("inf"))), JSON, 422,
     ["'radius_mean'", "Infinity"]),
    ("-Infinity", "POST", "/predict", _body(_with(1, float("-inf"))), JSON, 422,
     ["'texture_mean'", "-Infinity"]),
    ("1e400 overflows float64", "POST", "/predict",
     b'{"features": [' + b"1e400, " + ", ".join(map(str, ROW[1:])).encode() + b"]}", JSON,
     422, ["'radius_mean'", "Infinity"]),
    ("1e39 overflows float32", "POST", "/predict", _body(_with(27, 1e39)), JSON, 422,
     ["'concave_points_worst'", "1e+39", "float32"]),
    ("string value", "POST", "/predict", _body(_with(2, "abc")), JSON, 422,
     ["'perimeter_mean'", "a string", '"abc"', "expected a number"]),
    ("numeric string", "POST", "/predict", _body(_with(2, "1.5")), JSON, 422, ["a string"]),
    ("null value", "POST", "/predict", _body(_with(3, None)), JSON, 422,
     ["'area_mean'", "is null"]),
    ("boolean value", "POST", "/predict", _body(_with(5, True)), JSON, 422,
     ["'compactness_mean'", "a boolean (true)"]),
    ("nested list value", "POST", "/predict", _body(_with(6, [1.0, 2.0])), JSON, 422,
     ["'concavity_mean'", "is a list"]),
    ("object value", "POST", "/predict", _body(_with(6, {"a": 1})), JSON, 422,
     ["is an object"]),
    ("whole row nested", "POST", "/predict", _body([ROW]), JSON, 422,
     ["expected 30 feature values, got 1"]),
    ("features is a string", "POST", "/predict", _body("1,2,3"), JSON, 422,
     ["features must be a list of 30 numbers or an object", "a string"]),
    ("features is null", "POST", "/predict", _body(None), JSON, 422, ["got null"]),
    ("features is a number", "POST", "/predict", _body(1.5), JSON, 422, ["got a float"]),
    ("body is a list", "POST", "/predict", json.dumps(ROW).encode(), JSON, 422,
     ["must be a JSON object", "got a list"]),
    ("no features field", "POST", "/predict", b'{"feature": [1]}', JSON, 422,
     ["no 'features' field"]),
    ("extra field", "POST", "/predict",
     json.dumps({"features": ROW, "debug": True}).encode(), JSON, 422,
     ["unknown field(s)", "'debug'"]),
    ("empty body", "POST", "/predict", b"", JSON, 400, ["body is empty"]),
    ("whitespace body", "POST", "/predict", b"  \n", JSON, 400, ["body is empty"]),
    ("not JSON", "POST", "/predict", b"features=1,2,3", JSON, 400, ["not valid JSON"]),
    ("truncated JSON", "POST", "/predict", b'{"features": [1.0, 2.0', JSON, 400,
     ["not valid JSON"]),
    ("not UTF-8", "POST", "/predict", b'{"features": "\xff"}', JSON, 400, ["not valid JSON"]),
    ("text/plain", "POST", "/predict", _body(ROW), {"content-type": "text/plain"}, 415,
     ["unsupported Content-Type 'text/plain'", "application/json"]),
    ("form content type", "POST", "/predict", _body(ROW),
     {"content-type": "application/x-www-form-urlencoded"}, 415, ["x-www-form-urlencoded"]),
    ("no content type", "POST", "/predict", _body(ROW), {}, 415, ["Content-Type none"]),
    ("batch: text/plain", "POST", "/predict/batch", b"{}", {"content-type": "text/plain"}, 415,
     ["application/json"]),
    ("batch: no instances field", "POST", "/predict/batch", _body(ROW), JSON, 422,
     ["no 'instances' field"]),
    ("batch: instances not a list", "POST", "/predict/batch", b'{"instances": {"a": 1}}', JSON,
     422, ["'instances' must be a list", "an object"]),
    ("batch: empty instances", "POST", "/predict/batch", b'{"instances": []}', JSON, 422,
     ["'instances' is empty", "1 to 256 instances"]),
    ("batch: too many instances", "POST", "/predict/batch",
     json.dumps({"instances": [[1] * N] * 257}).encode(), JSON, 413,
     ["257 instances", "limit of 256"]),
    ("batch: one short instance", "POST", "/predict/batch",
     json.dumps({"instances": [ROW, ROW, ROW[:5]]}).encode(), JSON, 422,
     ["instances[2]: expected 30 feature values, got 5"]),
    ("batch: one string value", "POST", "/predict/batch",
     json.dumps({"instances": [ROW, _with(9, "x")]}).encode(), JSON, 422,
     ["instances[1]: feature 'fractal_dimension_mean' (index 9) is a string"]),
    ("batch: one NaN", "POST", "/predict/batch",
     json.dumps({"instances": [ROW, ROW, ROW, _with(7, float("nan"))]}).encode(), JSON, 422,
     ["instances[3]: feature 'concave_points_mean' (index 7) is NaN"]),
    ("batch: instance not a list", "POST", "/predict/batch",
     json.dumps({"instances": [ROW, 5]}).encode(), JSON, 422,
     ["instances[1]: features must be a list"]),
    ("batch: instance nested", "POST", "/predict/batch",
     json.dumps({"instances": [[ROW]]}).encode(), JSON, 422,
     ["instances[0]: expected 30 feature values, got 1"]),
    ("unknown route", "GET", "/nope", None, {}, 404, ["no route /nope", "POST /predict"]),
    ("unknown route, POST", "POST", "/predict/nope", _body(ROW), JSON, 404,
     ["no route /predict/nope"]),
    ("GET /predict", "GET", "/predict", None, {}, 405,
     ["method GET is not allowed on /predict", "POST /predict"]),
    ("PUT /predict/batch", "PUT", "/predict/batch", b"{}", JSON, 405, ["PUT"]),
    ("POST /model", "POST", "/model", b"{}", JSON, 405, ["method POST", "GET /model"]),
    ("DELETE /livez", "DELETE", "/livez", None, {}, 405, ["DELETE"]),
]


@pytest.fixture(scope="module")
def shared_client(trained: Any) -> Iterator[TestClient]:
    """One client for the whole table: it also shows that no bad request breaks the service."""
    with TestClient(create_app(Settings(model_path=trained.path))) as c:
        deadline = time.monotonic() + 10
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "model not ready"
            time.sleep(0.01)
        yield c


def assert_error(r: Any, status: int, words: list[str]) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    schemas.ErrorResponse.model_validate(body)
    assert body["error"]["request_id"] == r.headers["x-request-id"]
    text = body["error"]["message"] + " | expected: " + (body["error"].get("expected") or "")
    for word in words:
        assert word in text, (word, body)
    return dict(body["error"])


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_request_gets_clear_4xx_and_service_keeps_serving(
    shared_client: TestClient, method: str, path: str, body: bytes | None,
    headers: dict[str, str], status: int, words: list[str],
) -> None:
    r = shared_client.request(method, path, content=body, headers=headers)
    error = assert_error(r, status, words)
    if status in (400, 413, 415, 422):
        assert error.get("expected"), "say what a valid request looks like"
    if status == 405:
        assert r.headers["allow"]
    ok = shared_client.post("/predict", json={"features": ROW})
    assert ok.status_code == 200


def test_missing_and_unknown_feature_names_are_named(shared_client: TestClient) -> None:
    names = shared_client.get("/model").json()["feature_names"]
    by_name = dict(zip(names, ROW, strict=True))

    missing = {k: v for k, v in by_name.items() if k not in ("area_mean", "radius_worst")}
    error = assert_error(shared_client.post("/predict", json={"features": missing}), 422,
                         ["missing feature(s) 'area_mean', 'radius_worst'"])
    assert "unknown" not in error["message"]

    unknown = {**by_name, "radius_mean_typo": 1.0}
    error = assert_error(shared_client.post("/predict", json={"features": unknown}), 422,
                         ["unknown feature(s) 'radius_mean_typo'"])
    assert "missing" not in error["message"]

    renamed = {("Radius_Mean" if k == "radius_mean" else k): v for k, v in by_name.items()}
    assert_error(shared_client.post("/predict", json={"features": renamed}), 422,
                 ["missing feature(s) 'radius_mean'", "unknown feature(s) 'Radius_Mean'"])

    bad_value = {**by_name, "symmetry_worst": "high"}
    assert_error(shared_client.post("/predict", json={"features": bad_value}), 422,
                 ["feature 'symmetry_worst' (index 28) is a string"])

    batch = {"instances": [by_name, missing]}
    assert_error(shared_client.post("/predict/batch", json=batch), 422,
                 ["instances[1]: missing feature(s) 'area_mean', 'radius_worst'"])
    assert shared_client.post("/predict", json={"features": by_name}).status_code == 200


def test_many_missing_names_are_listed_briefly(shared_client: TestClient) -> None:
    error = assert_error(shared_client.post("/predict", json={"features": {}}), 422,
                         ["missing feature(s) 'radius_mean'", "and 25 more"])
    assert len(error["message"]) < 300


def test_body_over_limit_with_content_length_is_413_before_parsing(make_client: Any) -> None:
    client = make_client(max_body_bytes=1024)
    body = b'{"features": [' + b" " * 2000 + b"]}"  # would be a 422 if it were parsed
    r = client.post("/predict", content=body, headers=JSON)
    assert_error(r, 413, ["larger than the limit of 1024 bytes"])
    # the limit is on the body, not on the request: a small body still passes
    assert client.post("/predict", json={"features": ROW}).status_code == 200


def test_chunked_body_over_limit_is_413(make_client: Any) -> None:
    client = make_client(max_body_bytes=1024)

    def chunks() -> Iterator[bytes]:
        yield b'{"features": ['
        for _ in range(100):
            yield b"1.0, " * 10

    r = client.post("/predict", content=chunks(), headers=JSON)
    assert "content-length" not in r.request.headers  # really sent without a length
    assert_error(r, 413, ["larger than the limit of 1024 bytes"])
    assert client.post("/predict", json={"features": ROW}).status_code == 200


def test_chunked_body_under_limit_is_served(client: TestClient) -> None:
    payload = json.dumps({"features": ROW}).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 7):
            yield payload[i : i + 7]

    r = client.post("/predict", content=chunks(), headers=JSON)
    assert r.status_code == 200
    assert r.json() == client.post("/predict", json={"features": ROW}).json()


def test_content_type_with_charset_is_accepted(client: TestClient) -> None:
    r = client.post("/predict", content=json.dumps({"features": ROW}),
                    headers={"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200


def test_request_id_is_taken_from_header_or_made_and_always_echoed(client: TestClient) -> None:
    r = client.post("/predict", json={"features": ROW}, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.post("/predict", json={"features": ROW[:3]}, headers={"x-request-id": "e-42"})
    assert r.headers["x-request-id"] == "e-42"
    assert r.json()["error"]["request_id"] == "e-42"
    r = client.get("/livez", headers={"x-request-id": "live-1"})
    assert r.headers["x-request-id"] == "live-1"
    made = {client.get("/readyz").headers["x-request-id"] for _ in range(5)}
    assert len(made) == 5
    assert all(len(m) == 16 for m in made)
    too_long = "x" * 200
    r = client.get("/livez", headers={"x-request-id": too_long})
    assert r.headers["x-request-id"] != too_long  # unsafe ids are replaced, not echoed
    assert len(r.headers["x-request-id"]) == 16
