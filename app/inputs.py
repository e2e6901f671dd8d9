"""Request body -> float32 model input, with vectorised checks and messages that name the problem.

This module reads examples that are 1-D ([N, F] models): a list in feature order or an object
by feature name. Examples of more dimensions are nested lists (app/tensors.py, which shares the
helpers here: ``parse``, ``check_fields``, ``instances``, ``kind``).

The common case costs a few C-level passes (``set(map(type, ...))``, one ``np.array``, one
``np.isfinite``); Python loops over individual values run only to describe an error.

A value is accepted when it is a JSON number (int or float) that stays finite once cast to
float32, the dtype the model runs in. So NaN, Infinity and 1e39 (finite in float64, inf in
float32) are rejected, and so are booleans, strings, null, lists and objects. orjson refuses NaN,
Infinity and out-of-range numbers as invalid JSON; for a precise message the error path re-reads
such bodies with the lenient stdlib parser and runs the same checks, but a body only the lenient
parser accepts is never served.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any, TypeVar

import numpy as np
import orjson
from numpy.typing import NDArray

from app.errors import BadInputError, MalformedBodyError, PayloadTooLargeError, ServiceError

F32 = NDArray[np.float32]
T = TypeVar("T")

NUMBER_TYPES = frozenset({int, float})
ONLY_LISTS = frozenset({list})
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_LISTED = 5  # names listed in one message before "... and N more"
EXPECTED_FINITE = f"finite numbers with magnitude at most {_FLOAT32_MAX:g}"
EXPECTED_NUMBERS = "JSON numbers only: no strings, booleans, null, lists or objects"


class FeatureSpec:
    """The model's feature order, and the messages that describe a valid request for it."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.n = len(self.names)
        self.index = {name: i for i, name in enumerate(self.names)}
        getter = itemgetter(*self.names)
        # itemgetter of one key returns the value, not a 1-tuple
        self.values_of: Callable[[dict[str, Any]], tuple[Any, ...]] = (
            getter if self.n > 1 else (lambda d: (getter(d),))
        )
        example = f"[<{self.n} numbers in the order of GET /model feature_names>]"
        by_name = '{"<feature name>": <number>, ...}'
        self.expected_features = f"{example} or {by_name} with all {self.n} feature names"
        self.expected_single = f'{{"features": {example}}} or {{"features": {by_name}}}'
        self.expected_batch = f'{{"instances": [{example} or {by_name}, ...]}}'


def parse(body: bytes, convert: Callable[[Any], T]) -> T:
    """Parse ``body`` as JSON and ``convert`` it; every failure is a ServiceError."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise _explain_parse_error(body, e, convert) from None
    return convert(doc)


def _explain_parse_error(
    body: bytes, err: Exception, convert: Callable[[Any], object]
) -> Exception:
    if not body.strip():
        return MalformedBodyError("the request body is empty", expected="a JSON object")
    plain = MalformedBodyError(
        f"the request body is not valid JSON: {err}", expected="a JSON object"
    )
    try:
        doc = json.loads(body)  # reads NaN, Infinity and 1e400, which orjson refuses
    except (ValueError, RecursionError):
        return plain
    try:
        convert(doc)
    except ServiceError as e:
        return e
    return plain


def kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({json.dumps(shown)})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def prefix(where: str) -> str:
    return f"{where}: " if where else ""


def check_fields(doc: object, field: str, expected: str) -> Any:
    if type(doc) is not dict:
        raise BadInputError(f"the body must be a JSON object, got {kind(doc)}", expected=expected)
    if field not in doc:
        raise BadInputError(f"the body has no {field!r} field", expected=expected)
    if len(doc) != 1:
        unknown = [k for k in doc if k != field]
        raise BadInputError(f"unknown field(s) in the body: {_listed(unknown)}", expected=expected)
    return doc[field]


def _values(value: object, spec: FeatureSpec, where: str) -> Sequence[Any]:
    """One example (a list in feature order, or an object by name) -> its raw numbers in order."""
    p = prefix(where)
    if type(value) is list:
        if len(value) != spec.n:
            raise BadInputError(
                f"{p}expected {spec.n} feature values, got {len(value)}",
                expected=spec.expected_features,
            )
        seq: Sequence[Any] = value
    elif type(value) is dict:
        try:
            seq = spec.values_of(value)
        except KeyError:
            seq = ()
        if len(seq) != spec.n or len(value) != spec.n:
            missing = [n for n in spec.names if n not in value]
            unknown = [k for k in value if k not in spec.index]
            parts = [f"missing feature(s) {_listed(missing)}"] if missing else []
            parts += [f"unknown feature(s) {_listed(unknown)}"] if unknown else []
            raise BadInputError(p + "; ".join(parts), expected=spec.expected_features)
    else:
        raise BadInputError(
            f"{p}features must be a list of {spec.n} numbers or an object mapping feature names "
            f"to numbers, got {kind(value)}",
            expected=spec.expected_features,
        )
    if not set(map(type, seq)) <= NUMBER_TYPES:
        bad = [j for j, v in enumerate(seq) if type(v) not in NUMBER_TYPES]
        j = bad[0]
        more = f" (and {len(bad) - 1} more non-numeric values)" if len(bad) > 1 else ""
        raise BadInputError(
            f"{p}feature {spec.names[j]!r} (index {j}) is {kind(seq[j])}; expected a number"
            + more,
            expected=EXPECTED_NUMBERS,
        )
    return seq


def _float32(x64: NDArray[np.float64], spec: FeatureSpec, where: Callable[[int], str]) -> F32:
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = x64.astype(np.float32)
    if np.isfinite(x32).all():
        return x32
    rows, cols = np.nonzero(~np.isfinite(x32))
    i, j = int(rows[0]), int(cols[0])
    more = f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""
    raise BadInputError(
        f"{prefix(where(i))}feature {spec.names[j]!r} (index {j}) is "
        f"{not_float32(float(x64[i, j]))}" + more,
        expected=EXPECTED_FINITE,
    )


def not_float32(v: float) -> str:
    """What a float64 value that is not a finite float32 is, for a message."""
    if np.isnan(v):
        return "NaN"
    if np.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return f"{v:g}, beyond float32's range (largest {_FLOAT32_MAX:g})"


def float64_array(rows: Sequence[Any]) -> NDArray[np.float64]:
    try:
        return np.array(rows, dtype=np.float64)
    except OverflowError:  # a Python int beyond float64; only the lenient parser makes these
        raise BadInputError(
            "a feature value is too large", expected="finite float32 numbers"
        ) from None


def single_example(doc: object, spec: FeatureSpec) -> F32:
    """``{"features": [...] | {...}}`` -> float32 [1, n_features]."""
    seq = _values(check_fields(doc, "features", spec.expected_single), spec, "")
    x64 = float64_array([seq])
    if within_float32(seq):
        return x64.astype(np.float32)
    return _float32(x64, spec, lambda i: "")


def within_float32(seq: Sequence[float]) -> bool:
    """True when every number is finite and within float32's range, so it stays finite as
    float32: C-level passes over the Python numbers, cheaper than numpy's checks for one row.
    False sends the row to the exact check, which names the culprit."""
    try:  # a finite sum rules out NaN and Infinity (only the lenient parser makes those)
        return (math.isfinite(sum(seq)) and min(seq) >= -_FLOAT32_MAX
                and max(seq) <= _FLOAT32_MAX)
    except OverflowError:  # integers beyond float64
        return False


def batch_examples(doc: object, spec: FeatureSpec, max_batch: int) -> F32:
    """``{"instances": [...]}`` -> float32 [N, n_features], 1 <= N <= max_batch."""
    inst = instances(doc, spec.expected_batch, spec.expected_features, max_batch)
    if (
        set(map(type, inst)) == ONLY_LISTS
        and set(map(len, inst)) == {spec.n}
        and set(map(type, chain.from_iterable(inst))) <= NUMBER_TYPES
    ):
        rows: Sequence[Sequence[Any]] = inst  # the common case: checked without a Python loop
    else:
        rows = [_values(v, spec, f"instances[{i}]") for i, v in enumerate(inst)]
    return _float32(float64_array(rows), spec, lambda i: f"instances[{i}]")


def instances(doc: object, expected_batch: str, expected_each: str, max_batch: int) -> list[Any]:
    """``{"instances": [...]}`` -> the list, of 1 to max_batch examples (not yet checked)."""
    inst = check_fields(doc, "instances", expected_batch)
    limit = f"1 to {max_batch} instances, each {expected_each}"
    if type(inst) is not list:
        raise BadInputError(f"'instances' must be a list, got {kind(inst)}", expected=limit)
    if not inst:
        raise BadInputError("'instances' is empty", expected=limit)
    if len(inst) > max_batch:
        raise PayloadTooLargeError(
            f"{len(inst)} instances is more than the limit of {max_batch} per request",
            expected=f"at most {max_batch} instances; split larger batches",
        )
    return inst
