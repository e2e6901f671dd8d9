"""Request body -> float32 model input when examples have more than one dimension.

A model whose input is [N, 5, 40] takes one example as ``{"features": [[40 numbers], ... 5 such
lists]}``, an image model [N, 3, 32, 32] as [3][32][32] nested lists; ``/predict/batch`` takes
``{"instances": [...]}`` of those. Features by name are only for 1-D examples (app/inputs.py).

The common case costs one ``np.array`` of the nested lists (its dtype and shape prove them
regular and all numbers; only a boolean among numbers needs a closer look, see ``_numbers``),
one comparison for 0 and 1, and one ``np.isfinite``. Without ``dtype=float64`` on purpose: that
would quietly turn "1.5" and true into numbers. The next checks, still C-level passes, go level
by level (``set(map(type, ...))``, ``set(map(len, ...))``, ``chain.from_iterable``); Python walks
the lists only to describe an error, naming the position:

    expected shape [3, 32, 32], got [3, 32]
    features[1] has 31 values, expected 32
    features[0][4][7] is a string ("1.5"); expected a number
    instances[2]: features[1][15][3] is NaN
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

from app.errors import BadInputError
from app.inputs import (
    EXPECTED_FINITE,
    EXPECTED_NUMBERS,
    F32,
    NUMBER_TYPES,
    ONLY_LISTS,
    check_fields,
    float64_array,
    instances,
    kind,
    not_float32,
    prefix,
)

_MAX_DIMS_SHOWN = 8  # of a shape sent, in a message (JSON nests up to orjson's 1024 levels)


class ShapeSpec:
    """One example's shape, and the messages that describe a valid request for it."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(shape)
        self.shown = "[" + ", ".join(map(str, self.shape)) + "]"
        example = f"<nested lists of numbers, shape {self.shown}>"
        self.expected_features = (
            f"nested lists of JSON numbers of shape {self.shown} (GET /model input_shape)"
        )
        self.expected_single = f'{{"features": {example}}}'
        self.expected_batch = f'{{"instances": [{example}, ...]}}'


def single_example(doc: object, spec: ShapeSpec) -> F32:
    """``{"features": <nested lists>}`` -> float32 [1, *shape]."""
    value = check_fields(doc, "features", spec.expected_single)
    return _examples([value], spec, _alone)


def batch_examples(doc: object, spec: ShapeSpec, max_batch: int) -> F32:
    """``{"instances": [<nested lists>, ...]}`` -> float32 [N, *shape], 1 <= N <= max_batch."""
    inst = instances(doc, spec.expected_batch, spec.expected_features, max_batch)
    return _examples(inst, spec, _instance)


def _alone(i: int) -> str:
    return ""


def _instance(i: int) -> str:
    return f"instances[{i}]"


def _examples(examples: list[Any], spec: ShapeSpec, where: Callable[[int], str]) -> F32:
    x64 = _numbers(examples, spec.shape)
    if x64 is None:  # level by level: the numbers (big integers, say), or what is wrong
        numbers = leaves(examples, spec.shape)
        if numbers is None:
            for i, value in enumerate(examples):
                error = describe(value, spec, where(i))
                if error is not None:
                    raise error
            raise AssertionError("leaves refused examples in which describe finds no error")
        x64 = float64_array(numbers).reshape(len(examples), *spec.shape)
    return _float32(x64, where)


def _numbers(examples: list[Any], shape: tuple[int, ...]) -> NDArray[np.float64] | None:
    """The examples as float64 [N, *shape] if they are plainly that: numpy's own C-level pass,
    else None. numpy refuses ragged nesting, and makes a string array of strings and an object
    array of null, objects and integers beyond 64 bits; the one thing it lets through is a
    boolean among numbers (as 0 or 1), so only where a 0 or 1 appears are the leaves' types
    checked (``leaves``, about 0.03 us per number)."""
    try:
        x = np.array(examples)
    except ValueError:  # ragged
        return None
    if x.shape != (len(examples), *shape) or x.dtype.kind not in "fiu":
        return None
    if ((x == 0) | (x == 1)).any() and leaves(examples, shape) is None:
        return None
    return x.astype(np.float64, copy=False)


def leaves(examples: list[Any], shape: tuple[int, ...]) -> list[Any] | None:
    """All numbers of these examples in order, if each is a nesting of lists of exactly this
    shape holding only JSON numbers; otherwise None."""
    level = examples
    for d in shape:
        if set(map(type, level)) != ONLY_LISTS or set(map(len, level)) != {d}:
            return None
        level = list(chain.from_iterable(level))
    return level if set(map(type, level)) <= NUMBER_TYPES else None


def _float32(x64: NDArray[np.float64], where: Callable[[int], str]) -> F32:
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = x64.astype(np.float32)
    finite = np.isfinite(x32)
    if finite.all():
        return x32
    bad = np.argwhere(~finite)
    i, *position = bad[0].tolist()
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise BadInputError(
        f"{prefix(where(i))}{_path(position)} is {not_float32(float(x64[tuple(bad[0])]))}"
        + more,
        expected=EXPECTED_FINITE,
    )


def _path(position: Sequence[int]) -> str:
    return "features" + "".join(f"[{j}]" for j in position)


# ---------------------------------------------------------------- the error path only


def describe(value: object, spec: ShapeSpec, where: str) -> BadInputError | None:
    """The first thing wrong with one example, or None if nothing is."""
    p = prefix(where)
    if type(value) is not list:
        by_name = " (by name only for models with 1-D examples)" if type(value) is dict else ""
        return BadInputError(
            f"{p}features must be nested lists of numbers of shape {spec.shown}, got "
            f"{json_kind(value)}{by_name}",
            expected=spec.expected_features,
        )
    got = _regular_shape(value)
    if got is not None and tuple(got) != spec.shape:
        return BadInputError(f"{p}expected shape {spec.shown}, got {_shape_text(got)}",
                             expected=spec.expected_features)
    return _first_difference(value, spec.shape, (), p, spec)


def _shape_text(shape: list[int]) -> str:
    if len(shape) <= _MAX_DIMS_SHOWN:
        return str(shape)
    return f"[{', '.join(map(str, shape[:_MAX_DIMS_SHOWN]))}, ...] ({len(shape)} dimensions)"


def json_kind(value: object) -> str:
    """``kind``, with JSON's one number type: "a number (5)", not Python's int or float."""
    return f"a number ({value!r})" if type(value) in NUMBER_TYPES else kind(value)


def _regular_shape(value: list[Any]) -> list[int] | None:
    """The shape of a nesting of lists in which every list at one depth has the same length
    (numpy's notion), or None if it is ragged."""
    shape: list[int] = []
    level: list[Any] = [value]
    while level and type(level[0]) is list:
        lengths = set(map(len, level)) if set(map(type, level)) == ONLY_LISTS else None
        if lengths is None or len(lengths) != 1:
            return None
        shape.append(lengths.pop())
        level = list(chain.from_iterable(level))
    return None if list in set(map(type, level)) else shape


def _first_difference(
    value: object, dims: tuple[int, ...], position: tuple[int, ...], p: str, spec: ShapeSpec
) -> BadInputError | None:
    """Depth first, in the order of the JSON text: the first position that is not as expected."""
    if not dims:
        if type(value) in NUMBER_TYPES:
            return None
        return BadInputError(f"{p}{_path(position)} is {kind(value)}; expected a number",
                             expected=EXPECTED_NUMBERS)
    error = _not_a_list_of(dims[0], value, position, p, spec)
    if error is not None:
        return error
    items = cast(list[Any], value)
    if len(dims) == 1 and set(map(type, items)) <= NUMBER_TYPES:
        return None  # a whole row of numbers: no need to visit each
    for j, item in enumerate(items):
        error = _first_difference(item, dims[1:], (*position, j), p, spec)
        if error is not None:
            return error
    return None


def _not_a_list_of(
    n: int, value: object, position: tuple[int, ...], p: str, spec: ShapeSpec
) -> BadInputError | None:
    if type(value) is not list:
        return BadInputError(
            f"{p}{_path(position)} is {json_kind(value)}; expected a list of {n} values",
            expected=spec.expected_features,
        )
    if len(value) != n:
        return BadInputError(f"{p}{_path(position)} has {len(value)} values, expected {n}",
                             expected=spec.expected_features)
    return None
