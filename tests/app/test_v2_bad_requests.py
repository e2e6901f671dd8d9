"""Every bad Open Inference Protocol request gets its 4xx with ``{"error": "<message>"}``, the
message naming the input and the position, and the service keeps answering."""

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

N = 30
ROW = [float(v) for v in np.linspace(0.5, 30.5, N)]
INFER = "/v2/models/default/infer"
JSON = {"content-type": "application/json"}


def _tensor(data: Any = None, shape: Any = None, datatype: Any = "FP32", **more: Any) -> Any:
    t: dict[str, Any] = {"name": "features", "shape": [1, N] if shape is None else shape,
                         "datatype": datatype}
    if data is not None:
        t["data"] = data
    return {**t, **more}


def _req(*inputs: Any, **more: Any) -> bytes:
    # json, not orjson: it writes NaN and Infinity, which a sloppy client might send
    return json.dumps({"inputs": list(inputs) if inputs else [_tensor(ROW)], **more}).encode()


def _with(index: int, value: Any) -> list[Any]:
    row: list[Any] = list(ROW)
    row[index] = value
    return row


def _binary(raw: bytes, size: int | None = None, head_length: int | None = None,
            shape: Any = None, datatype: str = "FP32") -> tuple[bytes, dict[str, str]]:
    head = _req(_tensor(shape=shape, datatype=datatype,
                        parameters={"binary_data_size": len(raw) if size is None else size}))
    length = len(head) if head_length is None else head_length
    return head + raw, {"inference-header-content-length": str(length)}


F32_ROW = np.array([ROW], "<f4").tobytes()
NAN_ROW = np.array([_with(3, float("nan"))], "<f4").tobytes()
SHORT_BIN, SHORT_HDR = _binary(F32_ROW[:-4], size=len(F32_ROW))
ODD_BIN, ODD_HDR = _binary(F32_ROW[:-4])
NAN_BIN, NAN_HDR = _binary(NAN_ROW)
LONG_HDR_BIN, LONG_HDR = _binary(F32_ROW, head_length=10_000)
BAD_HDR_BIN, BAD_HDR = _binary(F32_ROW, head_length=-1)
EXTRA_BIN, _ = _binary(F32_ROW)

# (id, method, path, body, headers, status, words the message must contain)
CASES: list[tuple[str, str, str, bytes | None, dict[str, str], int, list[str]]] = [
    ("unknown model", "POST", "/v2/models/other/infer", _req(), JSON, 404,
     ["model 'other' is not served here", "'default'"]),
    ("unknown version", "POST", "/v2/models/default/versions/v9/infer", _req(), JSON, 404,
     ["has no version 'v9'"]),
    ("unknown model, metadata", "GET", "/v2/models/other", None, {}, 404, ["'other'"]),
    ("unknown v2 route", "GET", "/v2/repository/index", None, {}, 404,
     ["no route /v2/repository/index"]),
    ("GET infer", "GET", INFER, None, {}, 405, ["method GET is not allowed", "POST"]),
    ("empty body", "POST", INFER, b"", JSON, 400, ["body is empty"]),
    ("not JSON", "POST", INFER, b"inputs=1", JSON, 400, ["not valid JSON"]),
    ("NaN in JSON", "POST", INFER, _req(_tensor(_with(3, float("nan")))), JSON, 400,
     ["not valid JSON"]),
    ("body a list", "POST", INFER, b"[]", JSON, 400, ["must be a JSON object", "a list"]),
    ("no inputs", "POST", INFER, b"{}", JSON, 400, ["'inputs' must be a list of one input"]),
    ("two inputs", "POST", INFER, _req(_tensor(ROW), _tensor(ROW)), JSON, 400,
     ["got 2 inputs"]),
    ("unknown field", "POST", INFER, _req(inputz=1), JSON, 400, ["unknown field(s)", "'inputz'"]),
    ("input not an object", "POST", INFER, b'{"inputs": [5]}', JSON, 400,
     ["inputs[0] is a number (5)"]),
    ("unknown input name", "POST", INFER, _req({**_tensor(ROW), "name": "x"}), JSON, 400,
     ["unknown input 'x'", "'features'"]),
    ("BOOL", "POST", INFER, _req(_tensor([True] * N, datatype="BOOL")), JSON, 400,
     ["is BOOL", "not booleans"]),
    ("BYTES", "POST", INFER, _req(_tensor(["a"] * N, datatype="BYTES")), JSON, 400,
     ["is BYTES", "not byte strings"]),
    ("unknown datatype", "POST", INFER, _req(_tensor(ROW, datatype="FLOAT")), JSON, 400,
     ["unknown datatype 'FLOAT'"]),
    ("shape wrong width", "POST", INFER, _req(_tensor(ROW, shape=[1, 29])), JSON, 400,
     ["expected shape [N, 30]", "got [1, 29]"]),
    ("shape without batch", "POST", INFER, _req(_tensor(ROW, shape=[N])), JSON, 400,
     ["got [30]"]),
    ("shape not integers", "POST", INFER, _req(_tensor(ROW, shape=[1.0, 30.0])), JSON, 400,
     ["'shape' is a list"]),
    ("batch of 0", "POST", INFER, _req(_tensor([], shape=[0, N])), JSON, 400,
     ["batch size (shape[0]) is 0"]),
    ("batch over the limit", "POST", INFER, _req(_tensor([0.0] * N * 257, shape=[257, N])),
     JSON, 413, ["257 examples", "limit is 256"]),
    ("too few values", "POST", INFER, _req(_tensor(ROW[:-1])), JSON, 400,
     ["'data' has 29 values", "needs 30"]),
    ("data not a list", "POST", INFER, _req(_tensor("1,2")), JSON, 400, ["'data' is a string"]),
    ("no data", "POST", INFER, _req(_tensor()), JSON, 400, ["has no 'data'"]),
    ("string value", "POST", INFER, _req(_tensor(_with(7, "x"))), JSON, 400,
     ["input 'features'", "data[7] (index [0, 7]) is a string"]),
    ("boolean value", "POST", INFER, _req(_tensor(_with(2, True))), JSON, 400,
     ["data[2]", "a boolean"]),
    ("null value", "POST", INFER, _req(_tensor(_with(2, None))), JSON, 400,
     ["data[2]", "is null"]),
    ("nested, wrong shape", "POST", INFER, _req(_tensor([ROW[:15], ROW[15:]])), JSON, 400,
     ["expected shape [1, 30], got [2, 15]"]),
    ("nested, string inside", "POST", INFER, _req(_tensor([_with(11, "y")])), JSON, 400,
     ["data[0][11] is a string"]),
    ("1e39 overflows float32", "POST", INFER, _req(_tensor(_with(27, 1e39))), JSON, 400,
     ["data[27]", "1e+39", "float32"]),
    ("float as INT32", "POST", INFER, _req(_tensor(ROW, datatype="INT32")), JSON, 400,
     ["data[0]", "expected an integer (datatype INT32)"]),
    ("300 as UINT8", "POST", INFER, _req(_tensor([300] * N, datatype="UINT8")), JSON, 400,
     ["is 300, not an UINT8 value (0 to 255)"]),
    ("-1 as UINT16", "POST", INFER, _req(_tensor([1] * 29 + [-1], datatype="UINT16")), JSON,
     400, ["data[29]", "is -1"]),
    ("1e5 as FP16", "POST", INFER, _req(_tensor(_with(1, 1e5), datatype="FP16")), JSON, 400,
     ["data[1]", "beyond FP16's range"]),
    ("id not a string", "POST", INFER, _req(id=5), JSON, 400, ["'id' is a number (5)"]),
    ("parameters not an object", "POST", INFER, _req(parameters=[1]), JSON, 400,
     ["'parameters' of the request is a list"]),
    ("unknown output", "POST", INFER, _req(outputs=[{"name": "logits"}]), JSON, 400,
     ["unknown output 'logits'", "'probabilities', 'label'"]),
    ("output twice", "POST", INFER, _req(outputs=[{"name": "label"}, {"name": "label"}]), JSON,
     400, ["asked for twice"]),
    ("classification extension", "POST", INFER,
     _req(outputs=[{"name": "probabilities", "parameters": {"classification": 2}}]), JSON,
     400, ["classification extension is not supported"]),
    ("binary_data_output not bool", "POST", INFER,
     _req(parameters={"binary_data_output": "yes"}), JSON, 400, ["'binary_data_output'"]),
    ("text/plain", "POST", INFER, _req(), {"content-type": "text/plain"}, 415,
     ["unsupported Content-Type 'text/plain'"]),
    ("curl -d's form type", "POST", INFER, _req(),
     {"content-type": "application/x-www-form-urlencoded"}, 415,
     ["'application/x-www-form-urlencoded' (curl -d sends it", "application/json"]),
    ("gzip body", "POST", INFER, _req(), {**JSON, "content-encoding": "gzip"}, 415,
     ["Content-Encoding 'gzip'"]),
    ("binary: fewer bytes than declared", "POST", INFER, SHORT_BIN, SHORT_HDR, 400,
     ["'binary_data_size' is 120 but 116 bytes follow"]),
    ("binary: size not the shape's", "POST", INFER, ODD_BIN, ODD_HDR, 400,
     ["116 bytes of binary data do not make shape [1, 30] of FP32", "120 bytes"]),
    ("binary: NaN", "POST", INFER, NAN_BIN, NAN_HDR, 400, ["data[3] (index [0, 3]) is NaN"]),
    ("binary: header length past the body", "POST", INFER, LONG_HDR_BIN, LONG_HDR, 400,
     ["Inference-Header-Content-Length is 10000"]),
    ("binary: header length not a number", "POST", INFER, BAD_HDR_BIN, BAD_HDR, 400,
     ["Inference-Header-Content-Length is '-1'"]),
    ("binary: no header length", "POST", INFER, EXTRA_BIN, JSON, 400, ["not valid JSON"]),
    ("binary and data both", "POST", INFER,
     _req(_tensor(ROW, parameters={"binary_data_size": 120})), JSON, 400,
     ["both 'data' and a 'binary_data_size'"]),
]


@pytest.fixture(scope="module")
def shared_client(trained: Any) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_path=trained.path))) as c:
        deadline = time.monotonic() + 10
        while c.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "model not ready"
            time.sleep(0.01)
        yield c


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_v2_request_gets_its_4xx_and_the_service_keeps_serving(
    shared_client: TestClient, method: str, path: str, body: bytes | None,
    headers: dict[str, str], status: int, words: list[str],
) -> None:
    r = shared_client.request(method, path, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = schemas.V2Error.model_validate(r.json()).error
    for word in words:
        assert word in error, (word, error)
    assert r.headers["x-request-id"]
    ok = shared_client.post(INFER, content=_req(), headers=JSON)
    assert ok.status_code == 200, ok.text


def test_body_over_the_limit_is_413_before_parsing(trained: Any) -> None:
    settings = Settings(model_path=trained.path, max_body_bytes=2048)
    with TestClient(create_app(settings)) as c:
        while c.get("/v2/health/ready").status_code != 200:
            time.sleep(0.01)
        big = b'{"inputs": [' + b" " * 4096 + b"]}"
        r = c.post(INFER, content=big, headers=JSON)
        assert r.status_code == 413
        assert "larger than the limit of 2048 bytes" in r.json()["error"]
        assert r.headers["connection"] == "close"  # refused before its body was read
        assert c.post(INFER, content=_req(), headers=JSON).status_code == 200


def test_not_ready_is_503_in_the_v2_shape(trained: Any, tmp_path: Any) -> None:
    """Before the model is loaded: health says so, model routes answer 503 with the reason."""
    missing = Settings(model_path=tmp_path / "absent.onnx", fail_fast=False)
    with TestClient(create_app(missing)) as c:
        r = c.get("/v2/health/ready")
        assert (r.status_code, r.json()) == (503, {"ready": False})
        assert c.get("/v2/health/live").json() == {"live": True}
        ready = c.get("/v2/models/absent/ready")
        assert (ready.status_code, ready.json()) == (503, {"name": "absent", "ready": False})
        infer = c.post("/v2/models/absent/infer", content=_req(), headers=JSON)
        assert infer.status_code == 503
        assert "the model is not ready" in infer.json()["error"]
        assert c.get("/v2/models/absent").status_code == 503


def test_model_name_setting_and_head(trained: Any) -> None:
    with TestClient(create_app(Settings(model_path=trained.path, model_name="cancer"))) as c:
        while c.get("/v2/health/ready").status_code != 200:
            time.sleep(0.01)
        assert c.get("/v2/models/cancer").json()["name"] == "cancer"
        assert c.get("/v2/models/default").status_code == 404
        head = c.head("/v2/models/cancer/ready")
        assert head.status_code == 200
        assert head.content == b""
        assert int(head.headers["content-length"]) == len(c.get("/v2/models/cancer/ready")
                                                          .content)


def test_a_bad_model_name_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="model_name"):
        Settings(model_name="a/b")
