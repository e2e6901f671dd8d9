"""Unlabeled inputs from a new population, for ``bnserve-recalibrate``: a CSV file whose header
names the model's features (other columns, the target say, are ignored and listed), or a ``.npy``
array [N, *input shape]. Every value must be a finite number, and there must be enough rows for
per-channel means and variances to mean something.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from model_export import data

# One training mini-batch: the fewest rows batch norm ever normalised with while training. With
# N rows a variance estimate is off by about sqrt(2 / N) relative (25 % at 32), so fewer rows
# replace the statistics with noise; --min-rows lowers the bar knowingly.
MIN_ROWS = 32


class InputError(ValueError):
    """The new inputs cannot recalibrate the model; the message says what and where."""


@dataclass(frozen=True)
class NewInputs:
    x: NDArray[np.float64]  # [N, *input shape]
    sha256: str  # of the file's bytes
    source: str
    ignored: tuple[str, ...] = ()  # CSV columns that are not features of the model

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


def read(
    path: Path, feature_names: Sequence[str] | None, shape: tuple[int, ...],
    min_rows: int = MIN_ROWS,
) -> NewInputs:
    """``path`` (.csv or .npy) as float64 [N, *shape]; InputError when it cannot be used."""
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    raw = path.read_bytes()
    ignored: tuple[str, ...] = ()
    if path.suffix.lower() == ".npy":
        x = _npy(raw, path, shape)
    elif path.suffix.lower() in (".csv", ".tsv", ".txt"):
        if len(shape) != 1:
            raise InputError(f"{path}: this model takes {list(shape)} per example, which a CSV "
                             "row cannot hold; give the inputs as a .npy array [N, *input shape]")
        if feature_names is None:
            raise InputError(f"{path}: a CSV file is read by the model's feature names and this "
                             "model has none; name them with --features, or give a .npy array")
        x, ignored = _csv(raw, path, list(feature_names))
    else:
        raise InputError(f"{path}: expected a .csv or .npy file")
    if x.shape[0] < min_rows:
        raise InputError(f"{path}: {x.shape[0]} rows; recalibration needs at least {min_rows} "
                         "(fewer rows give per-channel means and variances that are mostly "
                         "noise; --min-rows lowers this)")
    return NewInputs(x, hashlib.sha256(raw).hexdigest(), str(path), ignored)


def _npy(raw: bytes, path: Path, shape: tuple[int, ...]) -> NDArray[np.float64]:
    try:
        arr: NDArray[Any] = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy array ({e})") from None
    if arr.dtype.kind not in "fiu":
        raise InputError(f"{path}: dtype {arr.dtype}; expected a numeric (float) array")
    if arr.ndim != len(shape) + 1 or tuple(arr.shape[1:]) != shape:
        raise InputError(f"{path}: array of shape {list(arr.shape)}; expected "
                         f"[N, {', '.join(map(str, shape))}] for this model's input")
    x = arr.astype(np.float64)
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        raise InputError(f"{path}: {len(bad)} NaN or infinite value(s), the first at index "
                         f"{tuple(int(i) for i in bad[0])}")
    return x


def _csv(
    raw: bytes, path: Path, features: list[str]
) -> tuple[NDArray[np.float64], tuple[str, ...]]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None
    rows = list(csv.reader(io.StringIO(text), delimiter=data.detect_delimiter(text)))
    if not rows:
        raise InputError(f"{path}: the file is empty")
    header = [h.strip() for h in rows[0]]
    missing = [f for f in features if f not in header]
    if missing:
        raise InputError(f"{path}: the model's feature columns {missing} are missing; the header "
                         f"has {header}")
    col = {name: i for i, name in enumerate(header)}
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    x = np.empty((len(body), len(features)), dtype=np.float64)
    for r, row in enumerate(body):
        line = r + 2  # 1-based, after the header
        if len(row) != len(header):
            raise InputError(f"{path}: line {line} has {len(row)} fields, the header has "
                             f"{len(header)}")
        for j, name in enumerate(features):
            cell = row[col[name]].strip()
            try:
                value = float(cell)
            except ValueError:
                raise InputError(f"{path}: line {line}, column {name!r}: {cell!r} is not a "
                                 "number") from None
            if not math.isfinite(value):
                raise InputError(f"{path}: line {line}, column {name!r}: {cell!r} is missing or "
                                 "not finite")
            x[r, j] = value
    return x, tuple(h for h in header if h not in features)
