"""The V2 codec's one-pass path for common requests (``V2Codec._common``) answers exactly as its
full path: for valid requests the same tensor, bit for bit, and the same id and outputs; and it
never accepts a request that the full path refuses. Hypothesis mutates valid requests (keys
dropped or added, values of other types, NaN, Infinity, out-of-range numbers, other shapes and
sizes) to look for a request where the two disagree."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.codecs import Decoded
from app.codecs.v2 import NUMERIC as V2_DTYPES
from app.codecs.v2 import V2Codec
from app.errors import ServiceError
from app.predictor import Predictor
from app.state import Model

N = 30
MAX_BATCH = 4


@pytest.fixture(scope="module")
def model(trained: Any) -> Model:
    return Model.of(Predictor.load(trained.path), MAX_BATCH)


def _full(codec: V2Codec, model: Model, body: bytes, length: bytes | None) -> Decoded:
    """The full path alone: the one-pass path turned off for this call."""
    plain = V2Codec(codec.model_name, codec.max_batch)
    plain._common = lambda *args: None  # type: ignore[method-assign]
    return plain.decode(model, body, length)


def _request(rows: np.ndarray[Any, Any], binary: bool, **more: Any) -> tuple[bytes, bytes | None]:
    tensor: dict[str, Any] = {"name": "features", "shape": list(rows.shape), "datatype": "FP32"}
    if not binary:
        tensor["data"] = rows.ravel().tolist()
        return orjson.dumps({"inputs": [tensor], **more}), None
    raw = rows.astype("<f4").tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    head = orjson.dumps({"inputs": [tensor], **more})
    return head + raw, b"%d" % len(head)


def _same(a: Decoded, b: Decoded) -> None:
    assert a.x.dtype == b.x.dtype == np.float32
    assert a.x.shape == b.x.shape
    assert a.x.tobytes() == b.x.tobytes()
    assert (a.single, a.context) == (b.single, b.context)


VALID = [
    ("one row, JSON", 1, False, {}),
    ("three rows, JSON", 3, False, {}),
    ("one row, binary", 1, True, {}),
    ("one row, binary, every output binary", 1, True,
     {"parameters": {"binary_data_output": True}}),
    ("max rows, binary, an id", MAX_BATCH, True, {"id": "req-7"}),
    ("JSON, binary outputs, an extension parameter", 2, False,
     {"parameters": {"binary_data_output": True, "sequence_id": 3}}),
    ("JSON, id null", 1, False, {"id": None}),
]


@pytest.mark.parametrize(("rows", "binary", "more"), [v[1:] for v in VALID],
                         ids=[v[0] for v in VALID])
def test_common_requests_take_the_one_pass_path_and_match_the_full_path(
    model: Model, rows: int, binary: bool, more: dict[str, Any],
) -> None:
    codec = V2Codec("default", MAX_BATCH)
    x = np.random.default_rng(rows).normal(size=(rows, N)).astype(np.float32)
    body, length = _request(x, binary, **more)
    head = body if length is None else body[: int(length)]
    tail = b"" if length is None else body[int(length):]
    fast = codec._common(model, orjson.loads(head), tail)
    assert fast is not None, "a common request left the one-pass path"
    _same(fast, _full(codec, model, body, length))
    assert np.array_equal(fast.x, x)


_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**63), 2**64 - 1),
    st.just(3.5e38), st.just(-3.5e38), st.booleans(), st.none(), st.text(max_size=2))
_ANY = st.one_of(_NUMBERS, st.lists(st.integers(-2, 40), max_size=3),
                 st.dictionaries(st.sampled_from(["binary_data_size", "binary_data_output",
                                                  "x"]), st.integers(-1, 200) | st.booleans(),
                                 max_size=2))


_DATATYPES = ["FP32", "FP64", "FP16", "INT32", "INT64", "UINT8", "BOOL", "BYTES"]


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    """A request, valid but for its row count (up to one over the limit) and datatype, then a
    few mutations anywhere in it."""
    rows = draw(st.integers(1, MAX_BATCH + 1))
    binary = draw(st.booleans())
    datatype = draw(st.sampled_from(["FP32"] * 4 + _DATATYPES))
    x = np.asarray(draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=rows * N,
                                 max_size=rows * N)), dtype=np.float32).reshape(rows, N)
    tensor: dict[str, Any] = {"name": "features", "shape": [rows, N], "datatype": datatype}
    doc: dict[str, Any] = {"inputs": [tensor]}
    raw = b""
    if binary:
        raw = x.astype(V2_DTYPES.get(datatype, np.dtype("<f4"))).tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        doc["parameters"] = {"binary_data_output": draw(st.booleans())}
    else:
        tensor["data"] = x.ravel().tolist()
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["doc", "tensor", "datatype", "data", "shape", "params",
                                      "raw"]))
        if where == "datatype":  # the values stay as they are
            tensor["datatype"] = draw(st.sampled_from(_DATATYPES))
        elif where == "doc":
            doc[draw(st.sampled_from(["id", "parameters", "outputs", "inputs", "other"]))] = (
                draw(_ANY))
        elif where == "tensor":
            key = draw(st.sampled_from(["name", "shape", "datatype", "parameters", "data", "x"]))
            if draw(st.booleans()):
                tensor.pop(key, None)
            else:
                tensor[key] = draw(st.one_of(_ANY, st.sampled_from([*_DATATYPES, "features"])))
        elif where == "data" and type(tensor.get("data")) is list and tensor["data"]:
            data = tensor["data"]
            data[draw(st.integers(0, len(data) - 1))] = draw(_NUMBERS)
        elif where == "shape":
            tensor["shape"] = draw(st.one_of(
                st.builds(lambda n: [n, N], st.integers(-1, MAX_BATCH + 2)),
                st.lists(st.integers(-1, 40) | st.booleans(), max_size=3)))
        elif where == "params":
            tensor["parameters"] = draw(_ANY)
        elif where == "raw" and len(raw) >= 4:
            at = 4 * draw(st.integers(0, len(raw) // 4 - 1))
            if draw(st.booleans()):  # a value made NaN, Infinity or -Infinity, size kept
                bad = draw(st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f",
                                            b"\x00\x00\x80\xff"]))
                raw = raw[:at] + bad + raw[at + 4:]
            else:  # bytes missing or extra, binary_data_size saying so or not
                raw = raw[:at] + draw(st.sampled_from([b"", b"\x01", b"\x00" * 4])) + raw[at + 1:]
                if draw(st.booleans()) and type(tensor.get("parameters")) is dict:
                    tensor["parameters"]["binary_data_size"] = len(raw)
    head = orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)
    return (head + raw, b"%d" % len(head)) if binary else (head, None)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=_mutated())
def test_the_one_pass_path_never_disagrees_with_the_full_path(
    model: Model, request: tuple[bytes, bytes | None],
) -> None:
    body, length = request
    codec = V2Codec("default", MAX_BATCH)
    head = body if length is None else body[: int(length)]
    tail = b"" if length is None else body[int(length):]
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError:  # orjson wrote it: only Infinity/NaN floats become null
        pytest.fail("orjson could not read what it wrote")
    fast = codec._common(model, doc, tail)
    try:
        full = _full(codec, model, body, length)
    except ServiceError:
        assert fast is None, "the one-pass path accepted a request the full path refuses"
        return
    if fast is not None:
        _same(fast, full)
        assert math.isfinite(float(fast.x.astype(np.float64).sum()))
