"""Model outputs -> the JSON answer, one encoder per output kind.

Each example's answer is the same object whether it came alone or inside a batch, and floats are
the exact float32 values (``.tolist()`` gives them as Python floats), so the bytes are
deterministic. A non-finite output (finite inputs far outside the training range can overflow
inside the network) is the client's 422, naming the example, never a NaN in an answer.

    classifier  {"class": ..., "class_index": ..., "probabilities": {name: p}, "model_version"}
    values      {"values": <nested lists of the output's shape>, "model_version"}
    batch       {"predictions": [<answer>, ...], "model_version"}
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from app.errors import BadInputError
from app.predictor import Outputs


def classes(names: tuple[str, ...], version: str, outputs: Outputs, batch: bool) -> bytes:
    """(probabilities [N, K], label [N]) -> the class of each example, and every probability."""
    probs, labels = outputs
    rows: list[list[float]] = probs.tolist()
    i = next((i for i, row in enumerate(rows) if not all(map(math.isfinite, row))), None)
    if i is not None:
        raise _overflow(i, batch, "feature values", "(NaN)")
    answers = [
        {"class": names[k], "class_index": k, "probabilities": dict(zip(names, p, strict=True)),
         "model_version": version}
        for p, k in zip(rows, labels.tolist(), strict=True)
    ]
    return _encode(answers, version, batch)


def values(version: str, outputs: Outputs, batch: bool) -> bytes:
    """(values [N, ...],) -> each example's values as nested lists (a number for [N])."""
    (out,) = outputs
    finite = np.isfinite(out).reshape(len(out), -1).all(axis=1)
    if not finite.all():
        raise _overflow(int(np.argmin(finite)), batch, "input values", "(NaN or Infinity)")
    answers = [{"values": v, "model_version": version} for v in out.tolist()]
    return _encode(answers, version, batch)


def _encode(answers: list[dict[str, Any]], version: str, batch: bool) -> bytes:
    if batch:
        return orjson.dumps({"predictions": answers, "model_version": version})
    return orjson.dumps(answers[0])


def _overflow(i: int, batch: bool, what: str, result: str) -> BadInputError:
    where = f"instances[{i}]: " if batch else ""
    return BadInputError(
        f"{where}these {what} make the model's output overflow {result}: they are far "
        "outside the range it was trained on",
        expected=f"{what} on the scale of the training data",
    )
