"""The Open Inference Protocol's REST binding ("V2", kserve/open-inference-protocol
``specification/protocol/inference_rest.md``): the documents of its GET routes, and the infer
request and answer, in JSON or with the binary tensor data extension.

An infer request names one input, ``features``, with its ``shape`` [N, *input_shape] (N from 1 to
BNSERVE_MAX_BATCH), its ``datatype`` and its values: ``data`` in row-major order, flat or nested
to exactly ``shape``, or, with the binary extension, ``parameters.binary_data_size`` bytes after
the JSON header (whose length the ``Inference-Header-Content-Length`` header gives), little
endian whatever this machine's byte order. FP32 is the model's own type; FP16, FP64 and the
integer types are accepted when every value is a valid value of its declared type and finite as
float32 (a JSON float sent as INT32, or 300 as UINT8, is refused, not rounded or wrapped).
BOOL and BYTES are refused: they are not numbers the model can read.

The answer has the outputs (``probabilities`` FP32 [N, K] and ``label`` INT64 [N] for a
classifier, ``values`` FP32 for a values model), all of them or those the request names in
``outputs``, each in JSON (``data``, flat) or as binary data: for every output when the request's
``parameters.binary_data_output`` is true (what tritonclient asks when it names no output), or
for one output whose ``parameters.binary_data`` is true. The numbers are the same float32 and
int64 values ``POST /predict`` answers with.

Messages name the input and the position (``input 'features': data[0][17] is NaN``); every
error is an ``app.errors.ServiceError``, shaped ``{"error": "..."}`` by app/errors.py.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import orjson
from numpy.typing import NDArray

from app import tensors
from app.codecs import Decoded, Headers
from app.errors import BadInputError, MalformedBodyError, PayloadTooLargeError
from app.errors import UnsupportedMediaTypeError as _MediaType
from app.inputs import (
    EXPECTED_FINITE,
    EXPECTED_NUMBERS,
    F32,
    NUMBER_TYPES,
    not_float32,
    within_float32,
)
from app.predictor import INPUT, Outputs
from app.state import Model
from app.tensors import json_kind as kind

EXTENSIONS = ("binary_tensor_data",)
PLATFORM = "onnxruntime_onnx"  # Triton's name for an ONNX model run by ONNX Runtime
HEADER_LENGTH = b"inference-header-content-length"
_LITTLE_ENDIAN = sys.byteorder == "little"  # the binary extension's byte order is little endian

# V2 datatype -> numpy dtype (little endian: the binary extension's byte order)
NUMERIC: dict[str, np.dtype[Any]] = {
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
}
REFUSED = {"BOOL": "booleans", "BYTES": "byte strings", "BF16": "bfloat16 values"}
_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_KEYS = frozenset({"name", "parameters"})
_JSON = [(b"content-type", b"application/json")]
_ACCEPTED_TYPES = (b"application/json", b"application/octet-stream")
_F32 = np.dtype("<f4")


@dataclass(frozen=True, slots=True)
class Asked:
    """What the answer must hold: the request's id, and which outputs, binary or not."""

    id: str | None
    outputs: tuple[tuple[int, bool], ...]  # (index in the model's outputs, as binary?)


_V2_NAME = {dt.name: name for name, dt in NUMERIC.items()}
# by dtype, not dtype.name, which costs a microsecond per call
_OUT_DATATYPE: dict[np.dtype[Any], str] = {np.dtype(np.float32): "FP32",
                                           np.dtype(np.int64): "INT64"}


def datatype(dtype: str) -> str:
    """The V2 name of a numpy dtype's name (float32 -> FP32)."""
    return _V2_NAME.get(dtype, dtype.upper())


# ------------------------------------------------------------------ the GET routes' documents


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "bnserve", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(name: str, model: Model) -> dict[str, Any]:
    """Name, versions, platform, and the tensors with -1 for the batch (and any symbolic) size."""
    info = model.predictor.info
    by_name = {o.name: o for o in info.outputs}

    def tensor(name: str, dtype: str, shape: list[str | int]) -> dict[str, Any]:
        return {"name": name, "datatype": datatype(dtype),
                "shape": [d if isinstance(d, int) else -1 for d in shape]}

    inp = info.inputs[0]
    return {
        "name": name,
        "versions": [model.version],
        "platform": PLATFORM,
        "inputs": [tensor(inp.name, inp.dtype, inp.shape)],
        "outputs": [tensor(n, by_name[n].dtype, by_name[n].shape)
                    for n in model.predictor.output_names],
    }


# ------------------------------------------------------------------ infer


class V2Codec:
    def __init__(self, model_name: str, max_batch: int) -> None:
        self.model_name = model_name
        self.max_batch = max_batch

    def check_content_type(self, content_type: bytes | None) -> None:
        """tritonclient sends none; JSON or octet-stream (binary data) are fine too."""
        if content_type is None:
            return
        if content_type.split(b";", 1)[0].strip().lower() not in _ACCEPTED_TYPES:
            got = content_type.decode(errors="replace")
            hint = (" (curl -d sends it: add -H 'Content-Type: application/json')"
                    if got.startswith("application/x-www-form-urlencoded") else "")
            raise _MediaType(f"unsupported Content-Type {got!r}{hint}",
                             expected="no Content-Type, application/json, or "
                             "application/octet-stream with binary tensor data")

    def decode(self, model: Model, body: bytes, header_length: bytes | None) -> Decoded:
        head, tail = _split(body, header_length)
        try:
            doc = orjson.loads(head)
        except orjson.JSONDecodeError as e:
            if not head.strip():
                raise MalformedBodyError("the request body is empty",
                                         expected="a JSON inference request") from None
            raise MalformedBodyError(f"the request body is not valid JSON: {e}",
                                     expected="a JSON inference request (NaN and Infinity "
                                     "are not JSON; send them as binary data, they will be "
                                     "refused all the same)") from None
        fast = self._common(model, doc, tail)
        if fast is not None:
            return fast
        if type(doc) is not dict:
            raise BadInputError(f"the body must be a JSON object, got {kind(doc)}",
                                expected='{"inputs": [{"name": "features", ...}]}')
        _no_unknown(doc, _REQUEST_KEYS, "the request")
        request_id = doc.get("id")
        if request_id is not None and type(request_id) is not str:
            raise BadInputError(f"'id' is {kind(request_id)}; expected a string")
        params = _parameters(doc, "the request")
        x = self._input(model, doc.get("inputs"), tail)
        asked = Asked(request_id, _outputs(model, doc.get("outputs"), params))
        return Decoded(x, len(x) == 1, asked)

    def _common(self, model: Model, doc: object, tail: bytes) -> Decoded | None:
        """The request clients send (what tritonclient sends): one FP32 input, flat JSON
        data or binary data, every output. Checked here in one pass, it answers exactly as the
        full path below would; None sends anything else there, which also words every error."""
        envelope = _common_envelope(doc)
        if envelope is None:
            return None
        spec, asked_id, binary_out = envelope
        shape, example = spec.get("shape"), model.predictor.input_shape
        if not self._common_shape(shape, example):
            return None
        n = shape[0]
        x = _common_values(spec, tail, n * math.prod(example))
        if x is None:
            return None
        outputs = _every_output(len(model.predictor.output_names), binary_out)
        return Decoded(x.reshape(shape), n == 1, Asked(asked_id, outputs))

    def _common_shape(self, value: object, example: tuple[int, ...]) -> TypeGuard[list[int]]:
        """[N, *example] with 1 <= N <= max_batch (True == 1 as N is refused)."""
        return (type(value) is list and len(value) == len(example) + 1
                and type(value[0]) is int and 1 <= value[0] <= self.max_batch
                and tuple(value[1:]) == example)

    def _input(self, model: Model, value: object, tail: bytes) -> F32:
        if type(value) is not list or len(value) != 1:
            got = f"{len(value)} inputs" if type(value) is list else kind(value)
            raise BadInputError(f"'inputs' must be a list of one input, got {got}",
                                expected=_expected_input(model))
        spec = value[0]
        if type(spec) is not dict:
            raise BadInputError(f"inputs[0] is {kind(spec)}; expected an object",
                                expected=_expected_input(model))
        _no_unknown(spec, _INPUT_KEYS, "inputs[0]")
        name = spec.get("name")
        if name != INPUT:
            shown = repr(name) if type(name) is str else kind(name)
            raise BadInputError(f"unknown input {shown}; the model's input is {INPUT!r}",
                                expected=_expected_input(model))
        where = f"input {INPUT!r}"
        dtype = _datatype(spec.get("datatype"), where)
        shape = self._shape(spec.get("shape"), model.predictor.input_shape, where)
        size = math.prod(shape)
        nbytes = _parameters(spec, where).get("binary_data_size")
        if nbytes is None:
            if tail:
                raise BadInputError(f"{len(tail)} bytes of binary data follow the JSON header but "
                                    f"{where} has no 'binary_data_size' parameter")
            if "data" not in spec:
                raise BadInputError(f"{where} has no 'data' and no 'binary_data_size' parameter",
                                    expected="'data': its values, or binary data")
            return _from_json(spec["data"], dtype, shape, where)
        if "data" in spec:
            raise BadInputError(f"{where} has both 'data' and a 'binary_data_size' parameter",
                                expected="one of the two")
        if type(nbytes) is not int or nbytes < 0:
            raise BadInputError(f"{where}: 'binary_data_size' is {kind(nbytes)}; expected a "
                                "non-negative integer")
        if nbytes != len(tail):
            raise BadInputError(f"{where}: 'binary_data_size' is {nbytes} but {len(tail)} bytes "
                                "follow the JSON header")
        if nbytes != size * dtype.itemsize:
            raise BadInputError(
                f"{where}: {nbytes} bytes of binary data do not make shape {list(shape)} of "
                f"{datatype(dtype.name)}, which takes {size} x {dtype.itemsize} = "
                f"{size * dtype.itemsize} bytes", expected="binary_data_size = the product of "
                "shape x the datatype's size")
        return _checked(np.frombuffer(tail, dtype).reshape(shape), dtype, where)

    def _shape(self, value: object, example: tuple[int, ...], where: str) -> tuple[int, ...]:
        if self._common_shape(value, example):
            return tuple(value)
        want = f"[N, {', '.join(map(str, example))}] with 1 <= N <= {self.max_batch}"
        if type(value) is not list or not all(type(d) is int for d in value):
            raise BadInputError(f"{where}: 'shape' is {kind(value)}; expected a list of integers",
                                expected=f"shape {want}")
        if len(value) != len(example) + 1 or tuple(value[1:]) != example:
            raise BadInputError(f"{where}: expected shape {want}, got {value}",
                                expected=f"shape {want}")
        n = value[0]
        if n < 1:
            raise BadInputError(f"{where}: the batch size (shape[0]) is {n}; expected "
                                f"1 to {self.max_batch}", expected=f"shape {want}")
        raise PayloadTooLargeError(f"{where}: {n} examples in one request; the limit is "
                                   f"{self.max_batch}", expected=f"shape {want}")

    def encode(self, model: Model, outputs: Outputs, decoded: Decoded) -> tuple[bytes, Headers]:
        asked: Asked = decoded.context
        _check_finite(model, outputs)
        names = model.predictor.output_names
        tensors_: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        for i, binary in asked.outputs:
            out = outputs[i]
            doc: dict[str, Any] = {"name": names[i], "datatype": _datatype_of(out.dtype),
                                   "shape": list(out.shape)}
            if binary:
                blob = (out if _LITTLE_ENDIAN else out.astype(out.dtype.newbyteorder("<"))
                        ).tobytes()
                doc["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                doc["data"] = out.ravel().tolist()
            tensors_.append(doc)
        answer: dict[str, Any] = {"model_name": self.model_name, "model_version": model.version}
        if asked.id is not None:
            answer["id"] = asked.id
        answer["outputs"] = tensors_
        head = orjson.dumps(answer)
        if not blobs:
            return head, _JSON
        return b"".join((head, *blobs)), [(b"content-type", b"application/octet-stream"),
                                          (HEADER_LENGTH, b"%d" % len(head))]


def _datatype_of(dtype: np.dtype[Any]) -> str:
    name = _OUT_DATATYPE.get(dtype)
    return datatype(dtype.name) if name is None else name


def _common_envelope(doc: object) -> tuple[dict[str, Any], str | None, bool] | None:
    """(the input, the id, binary outputs?) of a request with one FP32 input named as the
    model's, no ``outputs`` and well-formed parameters; None for any other."""
    if type(doc) is not dict or not doc.keys() <= _REQUEST_KEYS or "outputs" in doc:
        return None
    inputs, asked_id, params = doc.get("inputs"), doc.get("id"), doc.get("parameters", {})
    if (type(inputs) is not list or len(inputs) != 1 or type(params) is not dict
            or (asked_id is not None and type(asked_id) is not str)):
        return None
    binary_out, spec = params.get("binary_data_output", False), inputs[0]
    if (type(binary_out) is not bool or type(spec) is not dict
            or not spec.keys() <= _INPUT_KEYS or spec.get("name") != INPUT
            or spec.get("datatype") != "FP32"):
        return None
    return spec, asked_id, binary_out


def _common_values(spec: dict[str, Any], tail: bytes, size: int) -> F32 | None:
    """``size`` finite float32 values: flat JSON numbers within float32's range, or exactly
    ``size`` x 4 bytes of finite binary float32; None for anything else."""
    params = spec.get("parameters", {})
    if type(params) is not dict:
        return None
    nbytes = params.get("binary_data_size")
    if nbytes is None:
        data = spec.get("data")
        if (tail or type(data) is not list or len(data) != size
                or not set(map(type, data)) <= NUMBER_TYPES or not within_float32(data)):
            return None
        return np.array(data, dtype=np.float32)
    if ("data" in spec or type(nbytes) is not int or nbytes != len(tail)
            or nbytes != 4 * size or not _finite_f32(tail)):
        return None
    return np.frombuffer(tail, _F32)


@functools.cache
def _every_output(count: int, binary: bool) -> tuple[tuple[int, bool], ...]:
    return tuple((i, binary) for i in range(count))


def _finite_f32(data: bytes) -> bool:
    """Whether little-endian float32 bytes are all finite numbers: their float64 sum is finite
    exactly when every value is (float32's largest times any count here stays finite)."""
    if not _LITTLE_ENDIAN:
        return False  # the full path converts and checks
    return math.isfinite(sum(memoryview(data).cast("f")))


def _split(body: bytes, header_length: bytes | None) -> tuple[bytes, bytes]:
    """(JSON header, binary data) of a body."""
    if header_length is None:
        return body, b""
    text = header_length.decode(errors="replace")
    if not text.isascii() or not text.strip().isdigit():
        raise MalformedBodyError(f"Inference-Header-Content-Length is {text!r}; expected the "
                                 "JSON header's length in bytes")
    n = int(text)
    if n > len(body):
        raise MalformedBodyError(f"Inference-Header-Content-Length is {n} but the body has only "
                                 f"{len(body)} bytes")
    return body[:n], body[n:]


def _no_unknown(doc: dict[str, Any], known: frozenset[str], where: str) -> None:
    unknown = [k for k in doc if k not in known]
    if unknown:
        raise BadInputError(f"unknown field(s) in {where}: {', '.join(map(repr, unknown))}",
                            expected=f"only {', '.join(sorted(known))}")


def _parameters(doc: dict[str, Any], where: str) -> dict[str, Any]:
    params = doc.get("parameters", {})
    if type(params) is not dict:
        raise BadInputError(f"'parameters' of {where} is {kind(params)}; expected an object")
    return params


def _datatype(value: object, where: str) -> np.dtype[Any]:
    if type(value) is str and value in NUMERIC:
        return NUMERIC[value]
    if type(value) is str and value in REFUSED:
        raise BadInputError(f"{where} is {value}: the model reads numbers, not "
                            f"{REFUSED[value]}", expected="datatype FP32 (or FP16, FP64, INT*, "
                            "UINT* with values that fit float32)")
    shown = repr(value) if type(value) is str else kind(value)
    raise BadInputError(f"{where}: unknown datatype {shown}",
                        expected=f"one of {', '.join(NUMERIC)}")


def _expected_input(model: Model) -> str:
    shape = ", ".join(map(str, model.predictor.input_shape))
    return (f'"inputs": [{{"name": "{INPUT}", "shape": [N, {shape}], "datatype": "FP32", '
            '"data": [...]}]')


def _outputs(model: Model, value: object, params: dict[str, Any]) -> tuple[tuple[int, bool], ...]:
    """The outputs asked for, in the order asked (all, in the model's order, if none is)."""
    all_binary = params.get("binary_data_output", False)
    if type(all_binary) is not bool:
        raise BadInputError(f"parameter 'binary_data_output' is {kind(all_binary)}; expected "
                            "true or false")
    names = model.predictor.output_names
    if value is None or value == []:
        return _every_output(len(names), all_binary)
    if type(value) is not list:
        raise BadInputError(f"'outputs' is {kind(value)}; expected a list of objects",
                            expected=f'"outputs": [{{"name": one of {names}}}, ...]')
    asked: list[tuple[int, bool]] = []
    for j, out in enumerate(value):
        where = f"outputs[{j}]"
        if type(out) is not dict:
            raise BadInputError(f"{where} is {kind(out)}; expected an object")
        _no_unknown(out, _OUTPUT_KEYS, where)
        name = out.get("name")
        if type(name) is not str or name not in names:
            shown = repr(name) if type(name) is str else kind(name)
            raise BadInputError(f"{where}: unknown output {shown}; the model's outputs are "
                                f"{', '.join(map(repr, names))}")
        i = names.index(name)
        if any(k == i for k, _ in asked):
            raise BadInputError(f"{where}: output {name!r} is asked for twice")
        p = _parameters(out, where)
        binary = p.get("binary_data", all_binary)
        if type(binary) is not bool:
            raise BadInputError(f"{where}: parameter 'binary_data' is {kind(binary)}; expected "
                                "true or false")
        if p.get("classification", 0) not in (0, None):
            raise BadInputError(f"{where}: the classification extension is not supported",
                                expected=f"ask for {names[0]!r}; the probabilities are there")
        asked.append((i, binary))
    return tuple(asked)


# ------------------------------------------------------------------ values


def _from_json(data: object, dtype: np.dtype[Any], shape: tuple[int, ...], where: str) -> F32:
    """``data``, flat or nested to exactly ``shape``, of JSON numbers valid for ``dtype``."""
    size = math.prod(shape)
    if type(data) is not list:
        raise BadInputError(f"{where}: 'data' is {kind(data)}; expected a list of numbers")
    nested = bool(data) and type(data[0]) is list
    leaves = tensors.leaves([data], shape) if nested else data
    if leaves is None:  # describe what is wrong with the nesting, by position
        error = tensors.describe(data, tensors.ShapeSpec(shape), "")
        message = error.message if error else "'data' is not nested to its shape"
        raise BadInputError(f"{where}: {message.replace('features', 'data', 1)}",
                            expected=f"'data' flat ({size} numbers) or nested to shape "
                            f"{list(shape)}")
    if len(leaves) != size:
        raise BadInputError(f"{where}: 'data' has {len(leaves)} values; shape {list(shape)} "
                            f"needs {size}", expected=f"{size} numbers, row-major")
    integer = dtype.kind in "iu"
    types = set(map(type, leaves))
    if not types <= ({int} if integer else NUMBER_TYPES):
        j = next(j for j, v in enumerate(leaves)
                 if type(v) not in NUMBER_TYPES or (integer and type(v) is not int))
        raise BadInputError(
            f"{where}: {_position(j, shape, nested)} is {kind(leaves[j])}; expected "
            + ("an integer (datatype " + datatype(dtype.name) + ")" if integer else "a number"),
            expected=EXPECTED_NUMBERS)
    if integer:
        info = np.iinfo(dtype)
        if min(leaves) < info.min or max(leaves) > info.max:
            j = next(j for j, v in enumerate(leaves) if not info.min <= v <= info.max)
            raise BadInputError(f"{where}: {_position(j, shape, nested)} is {leaves[j]}, not an "
                                f"{datatype(dtype.name)} value ({info.min} to {info.max})")
        return np.array(leaves, dtype=np.float64).astype(np.float32).reshape(shape)
    if dtype.itemsize >= 4 and within_float32(leaves):  # the common case: no numpy checks
        return np.array(leaves, dtype=np.float32).reshape(shape)
    try:
        x64 = np.array(leaves, dtype=np.float64)
    except OverflowError:  # a JSON integer beyond float64
        raise BadInputError(f"{where}: a value is too large", expected="finite float32 numbers")\
            from None
    return _checked(x64.reshape(shape), dtype, where, nested)


def _checked(x: NDArray[Any], dtype: np.dtype[Any], where: str, nested: bool = False) -> F32:
    """As float32, if every value is finite as ``dtype`` and as float32 (integers always are)."""
    if x.dtype == np.float32 and math.isfinite(x.sum(dtype=np.float64)):
        return x  # binary FP32, all finite: a float64 sum is not finite iff a value is not
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = x.astype(np.float32)
        if dtype.kind in "iu":
            return x32
        finite = np.isfinite(x32)
        if dtype.itemsize < 4:  # FP16: a JSON number must also be a valid half float
            finite &= np.isfinite(x.astype(dtype))
    if finite.all():
        return x32
    bad = np.argwhere(~finite)
    pos = tuple(bad[0].tolist())
    v = float(x[pos])
    what = (not_float32(v) if not np.isfinite(x32[pos])
            else f"{v:g}, beyond {datatype(dtype.name)}'s range")
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    j = int(np.ravel_multi_index(pos, x.shape))
    raise BadInputError(f"{where}: {_position(j, x.shape, nested)} is {what}{more}",
                        expected=EXPECTED_FINITE)


def _position(j: int, shape: tuple[int, ...], nested: bool) -> str:
    index = list(np.unravel_index(j, shape))
    if nested:
        return "data" + "".join(f"[{int(i)}]" for i in index)
    return f"data[{j}] (index {[int(i) for i in index]})"


def _check_finite(model: Model, outputs: Outputs) -> None:
    """A non-finite output is the client's 400, as in POST /predict (app/answers.py). A float64
    sum of float32 values is finite exactly when they all are: one C-level pass."""
    first = outputs[0]
    if math.isfinite(sum(first.ravel().tolist())):
        return
    finite = np.isfinite(first).reshape(len(first), -1).all(axis=1)
    i = int(np.argmin(finite))
    raise BadInputError(
        f"example {i} (row {i} of input {INPUT!r}) makes the model's output overflow (NaN "
        "or Infinity): its values are far outside the range the model was trained on",
        expected="input values on the scale of the training data")
