"""Bad requests to models whose examples have several dimensions (an image classifier [3, 8, 8]
and a values model [5, 40]): each gets a clear 4xx in the one error shape, with a message naming
the position, and the service keeps serving."""

from __future__ import annotations

import copy
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

# Any finite values are valid inputs; these are easy to recognise in a message.
IMAGE = np.arange(3 * 8 * 8, dtype=np.float64).reshape(3, 8, 8) / 10
SEQUENCE = np.arange(5 * 40, dtype=np.float64).reshape(5, 40) / 10
IMG, SEQ = IMAGE.tolist(), SEQUENCE.tolist()
JSON = {"content-type": "application/json"}
MAX_BATCH = 4


def body(features: Any) -> bytes:
    return json.dumps({"features": features}).encode()  # json writes NaN/Infinity; orjson not


def batch(*instances: Any) -> bytes:
    return json.dumps({"instances": list(instances)}).encode()


def put(nested: list[Any], index: tuple[int, ...], value: Any) -> list[Any]:
    """A copy of ``nested`` with one position replaced, added at the end, or (value ...)
    removed."""
    out = copy.deepcopy(nested)
    *path, last = index
    target = out
    for i in path:
        target = target[i]
    if value is ...:
        del target[last]
    elif last == len(target):
        target.append(value)
    else:
        target[last] = value
    return out


# (id, model, path, body, status, words the message (or expected) must contain)
CASES: list[tuple[str, str, str, bytes, int, list[str]]] = [
    ("a dimension missing", "image", "/predict", body(IMAGE[:, :, 0].tolist()), 422,
     ["expected shape [3, 8, 8], got [3, 8]"]),
    ("flattened", "image", "/predict", body(IMAGE.ravel().tolist()), 422,
     ["expected shape [3, 8, 8], got [192]"]),
    ("channels last", "image", "/predict", body(IMAGE.transpose(1, 2, 0).tolist()), 422,
     ["expected shape [3, 8, 8], got [8, 8, 3]"]),
    ("a batch of one as features", "image", "/predict", body([IMG]), 422,
     ["expected shape [3, 8, 8], got [1, 3, 8, 8]"]),
    ("empty list", "image", "/predict", body([]), 422, ["expected shape [3, 8, 8], got [0]"]),
    ("nested 500 deep", "image", "/predict", b'{"features": ' + b"[" * 500 + b"1" + b"]" * 500
     + b"}", 422, ["got [1, 1, 1, 1, 1, 1, 1, 1, ...] (500 dimensions)"]),
    ("one short row", "image", "/predict", body(put(IMG, (1, 2, 7), ...)), 422,
     ["features[1][2] has 7 values, expected 8"]),
    ("one long row", "image", "/predict", body(put(IMG, (2, 0, 8), 1.0)), 422,
     ["features[2][0] has 9 values, expected 8"]),
    ("one row missing", "image", "/predict", body(put(IMG, (1, 7), ...)), 422,
     ["features[1] has 7 values, expected 8"]),
    ("a number where a row belongs", "image", "/predict", body(put(IMG, (2, 3), 5)), 422,
     ["features[2][3] is a number (5); expected a list of 8 values"]),
    ("a list where a number belongs", "image", "/predict", body(put(IMG, (0, 0, 3), [1.0])),
     422, ["features[0][0][3] is a list; expected a number"]),
    ("NaN", "image", "/predict", body(put(IMG, (2, 5, 3), float("nan"))), 422,
     ["features[2][5][3] is NaN", "finite numbers"]),
    ("two NaN", "image", "/predict",
     body(put(put(IMG, (2, 5, 3), float("nan")), (0, 1, 1), float("nan"))), 422,
     ["features[0][1][1] is NaN (and 1 more)"]),
    ("Infinity", "image", "/predict", body(put(IMG, (0, 7, 7), float("inf"))), 422,
     ["features[0][7][7] is Infinity"]),
    ("-Infinity", "image", "/predict", body(put(IMG, (1, 0, 0), float("-inf"))), 422,
     ["features[1][0][0] is -Infinity"]),
    ("1e39 overflows float32", "image", "/predict", body(put(IMG, (0, 0, 0), 1e39)), 422,
     ["features[0][0][0] is 1e+39, beyond float32's range"]),
    ("1e400 overflows float64", "image", "/predict",
     body(put(IMG, (0, 0, 1), 12345.5)).replace(b"12345.5", b"1e400"), 422,
     ["features[0][0][1] is Infinity"]),
    ("string", "image", "/predict", body(put(IMG, (0, 1, 2), "abc")), 422,
     ['features[0][1][2] is a string ("abc"); expected a number', "JSON numbers only"]),
    ("numeric string", "image", "/predict", body(put(IMG, (0, 1, 2), "1.5")), 422,
     ['features[0][1][2] is a string ("1.5")']),
    ("boolean", "image", "/predict", body(put(IMG, (1, 1, 1), True)), 422,
     ["features[1][1][1] is a boolean (true); expected a number"]),
    ("boolean, no other 0 or 1", "image", "/predict",
     body(put((IMAGE + 2).tolist(), (2, 2, 2), False)), 422,
     ["features[2][2][2] is a boolean (false); expected a number"]),
    ("null", "image", "/predict", body(put(IMG, (1, 1, 1), None)), 422,
     ["features[1][1][1] is null; expected a number"]),
    ("object at a leaf", "image", "/predict", body(put(IMG, (2, 2, 2), {"v": 1})), 422,
     ["features[2][2][2] is an object; expected a number"]),
    ("features by name", "image", "/predict", body({"pixel": 1.0}), 422,
     ["got an object (by name only for models with 1-D examples)"]),
    ("features a string", "image", "/predict", body("cat.png"), 422,
     ['nested lists of numbers of shape [3, 8, 8], got a string ("cat.png")']),
    ("features null", "image", "/predict", body(None), 422, ["got null"]),
    ("features a number", "image", "/predict", body(1.5), 422, ["got a number (1.5)"]),
    ("no features field", "image", "/predict", b'{"image": []}', 422, ["no 'features' field"]),
    ("extra field", "image", "/predict", json.dumps({"features": IMG, "x": 1}).encode(), 422,
     ["unknown field(s) in the body: 'x'"]),
    ("empty body", "image", "/predict", b"", 400, ["body is empty"]),
    ("not JSON", "image", "/predict", b"[[[1, 2", 400, ["not valid JSON"]),
    ("batch: one wrong shape", "image", "/predict/batch", batch(IMG, IMAGE[0].tolist()), 422,
     ["instances[1]: expected shape [3, 8, 8], got [8, 8]"]),
    ("batch: one ragged", "image", "/predict/batch", batch(IMG, put(IMG, (0, 4, 2), ...)), 422,
     ["instances[1]: features[0][4] has 7 values, expected 8"]),
    ("batch: one NaN", "image", "/predict/batch",
     batch(IMG, IMG, put(IMG, (0, 0, 1), float("nan"))), 422,
     ["instances[2]: features[0][0][1] is NaN"]),
    ("batch: one string", "image", "/predict/batch", batch(put(IMG, (2, 7, 7), "x"), IMG), 422,
     ['instances[0]: features[2][7][7] is a string ("x")']),
    ("batch: one by name", "image", "/predict/batch", batch(IMG, {"a": 1}), 422,
     ["instances[1]: features must be nested lists of numbers of shape [3, 8, 8]"]),
    ("batch: empty", "image", "/predict/batch", batch(), 422,
     ["'instances' is empty", "nested lists of JSON numbers of shape [3, 8, 8]"]),
    ("batch: too many", "image", "/predict/batch", batch(*[IMG] * (MAX_BATCH + 1)), 413,
     [f"{MAX_BATCH + 1} instances is more than the limit of {MAX_BATCH}"]),
    ("batch: not a list", "image", "/predict/batch", b'{"instances": {"a": 1}}', 422,
     ["'instances' must be a list, got an object"]),
    ("values model: transposed", "sequence", "/predict", body(SEQUENCE.T.tolist()), 422,
     ["expected shape [5, 40], got [40, 5]"]),
    ("values model: short step", "sequence", "/predict", body(put(SEQ, (2, 39), ...)), 422,
     ["features[2] has 39 values, expected 40"]),
    ("values model: NaN", "sequence", "/predict", body(put(SEQ, (4, 39), float("nan"))), 422,
     ["features[4][39] is NaN"]),
    ("values model: batch boolean", "sequence", "/predict/batch",
     batch(SEQ, put(SEQ, (0, 0), False)), 422,
     ["instances[1]: features[0][0] is a boolean (false); expected a number"]),
]
VALID = {"image": IMG, "sequence": SEQ}


@pytest.fixture(scope="module")
def clients(contract_models: dict[str, Any]) -> Iterator[dict[str, TestClient]]:
    """One client per model for the whole table: it also shows that no bad request breaks it."""
    with (
        TestClient(create_app(Settings(model_path=contract_models["image"].path,
                                       max_batch=MAX_BATCH))) as image,
        TestClient(create_app(Settings(model_path=contract_models["sequence"].path,
                                       max_batch=MAX_BATCH))) as sequence,
    ):
        deadline = time.monotonic() + 10
        for c in (image, sequence):
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "model not ready"
                time.sleep(0.01)
        yield {"image": image, "sequence": sequence}


def assert_error(r: Any, status: int, words: list[str]) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    schemas.ErrorResponse.model_validate(doc)
    assert doc["error"]["request_id"] == r.headers["x-request-id"]
    assert doc["error"].get("expected"), "say what a valid request looks like"
    text = doc["error"]["message"] + " | expected: " + doc["error"]["expected"]
    for word in words:
        assert word in text, (word, doc)
    return dict(doc["error"])


@pytest.mark.parametrize(("model", "path", "content", "status", "words"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_tensor_request_gets_clear_4xx_naming_the_position_and_service_keeps_serving(
    clients: dict[str, TestClient], model: str, path: str, content: bytes, status: int,
    words: list[str],
) -> None:
    client = clients[model]
    assert_error(client.post(path, content=content, headers=JSON), status, words)
    ok = client.post("/predict", json={"features": VALID[model]})
    assert ok.status_code == 200, ok.text


def test_messages_verbatim(clients: dict[str, TestClient]) -> None:
    """The wording a client sees for the common mistakes, in full."""
    image = clients["image"]

    def message(content: bytes, path: str = "/predict") -> str:
        text: str = image.post(path, content=content, headers=JSON).json()["error"]["message"]
        return text

    assert message(body(IMAGE[:, 0].tolist())) == "expected shape [3, 8, 8], got [3, 8]"
    assert message(body(put(IMG, (1, 7), ...))) == "features[1] has 7 values, expected 8"
    assert message(body(put(IMG, (2, 5, 3), float("nan")))) == "features[2][5][3] is NaN"
    assert message(body(put(IMG, (0, 1, 2), "abc"))) == (
        'features[0][1][2] is a string ("abc"); expected a number')
    assert message(batch(IMG, put(IMG, (0, 0, 1), float("inf"))), "/predict/batch") == (
        "instances[1]: features[0][0][1] is Infinity")
    r = image.post("/predict", content=body([]), headers=JSON)
    assert r.json()["error"]["expected"] == (
        "nested lists of JSON numbers of shape [3, 8, 8] (GET /model input_shape)")


def test_integers_and_floats_mix_freely_and_give_the_same_answer(
    clients: dict[str, TestClient],
) -> None:
    image = clients["image"]
    whole = np.round(IMAGE * 10)  # integral values, sent once as ints and once as floats
    as_ints = image.post("/predict", json={"features": whole.astype(int).tolist()})
    as_floats = image.post("/predict", json={"features": whole.tolist()})
    assert as_ints.status_code == 200
    assert as_ints.content == as_floats.content


def test_integers_up_to_64_bits_are_numbers(clients: dict[str, TestClient]) -> None:
    image = clients["image"]
    ints = np.arange(3 * 8 * 8).reshape(3, 8, 8).tolist()  # an int64 array to numpy
    big = put(ints, (0, 0, 0), 2**64 - 1)  # beyond int64: numpy makes uint64 or object
    as_float = put(ints, (0, 0, 0), float(2**64 - 1))
    for features in (ints, big):
        r = image.post("/predict", json={"features": features})
        assert r.status_code == 200, r.text
    assert image.post("/predict", json={"features": big}).content == image.post(
        "/predict", json={"features": as_float}).content
