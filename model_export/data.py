"""Tabular data: the shipped default data set, users' CSV files, and a seeded stratified split."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

DEFAULT_DATA_NAME = "breast_cancer.csv"
DEFAULT_TARGET = "diagnosis"
DELIMITERS = ",;\t|"  # the separators a CSV file may use; detected from its first lines
_SNIFF_LINES = 20


class DataError(ValueError):
    """The data cannot train a model; the message says what is wrong and where."""


@dataclass(frozen=True)
class Dataset:
    x: NDArray[np.float64]  # (n, n_features), raw feature values
    y: NDArray[np.int64]  # (n,), index into class_names
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    sha256: str  # of the file's bytes
    source: str
    delimiter: str = ","


def default_data_bytes() -> bytes:
    return (resources.files("model_export") / "data" / DEFAULT_DATA_NAME).read_bytes()


def load_default() -> Dataset:
    """Breast Cancer Wisconsin (Diagnostic), shipped with the package (see data/SOURCE.md)."""
    return parse_csv(default_data_bytes(), DEFAULT_TARGET, None, f"bnserve:{DEFAULT_DATA_NAME}")


def load_csv(path: str | Path, target: str, features: list[str] | None = None) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return parse_csv(path.read_bytes(), target, features, str(path))


def _class_order(labels: list[str]) -> list[str]:
    unique = sorted(set(labels))
    try:  # numeric labels sort as numbers, so "10" comes after "2"
        return sorted(unique, key=float)
    except ValueError:
        return unique


def detect_delimiter(text: str) -> str:
    """The separator of a CSV text, one of ``DELIMITERS``, from its header and first rows
    (``csv.Sniffer``); ``,`` when it cannot tell (a file of one column, say)."""
    sample = "".join(itertools.islice(io.StringIO(text), _SNIFF_LINES))
    try:
        found = csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
    except csv.Error:
        return ","
    header = next(csv.reader(io.StringIO(sample), delimiter=found), [])
    return found if found in DELIMITERS and len(header) > 1 else ","


def _separator_hint(header: list[str]) -> str:
    if len(header) != 1:
        return ""
    return (" (the header was read as one column: bnserve reads files separated by ',', ';', "
            "tab or '|', and detects which from the first lines)")


def _text_columns(
    body: list[list[str]], col: dict[str, int], names: list[str], delimiter: str
) -> list[str]:
    """The columns among ``names`` holding a non-empty cell that is not a number (a decimal comma
    counts as a number here: it gets its own hint)."""
    found = []
    for name in names:
        for row in body:
            cell = row[col[name]].strip() if col[name] < len(row) else ""
            if cell and not _is_number(cell) and not (
                delimiter != "," and _is_number(cell.replace(",", ".", 1))
            ):
                found.append(name)
                break
    return found


def _not_a_number(
    source: str, line: int, name: str, cell: str, body: list[list[str]], col: dict[str, int],
    features: list[str], chosen: bool, delimiter: str,
) -> DataError:
    """The message for a feature cell that is not a number, with a hint when one fits: a decimal
    comma, or text columns (ids, names) to leave out with ``--features``."""
    message = f"{source}: line {line}, column {name!r}: {cell!r} is not a number"
    if not cell:
        return DataError(message)
    if delimiter != "," and _is_number(cell.replace(",", ".", 1)):
        return DataError(f"{message} (a decimal comma? bnserve reads decimal points: "
                         f"{cell.replace(',', '.', 1)})")
    text = _text_columns(body, col, features, delimiter)
    numeric = [f for f in features if f not in text]
    if len(text) == 1:
        what = f"column {text[0]!r} holds text (an id or a name?)"
    else:
        what = f"columns {', '.join(map(repr, text))} hold text (ids or names?)"
    if chosen:
        advice = f"leave {'it' if len(text) == 1 else 'them'} out of --features"
    else:
        advice = ("every column but the target is a feature unless --features names the "
                  "feature columns")
    example = f", e.g. --features {','.join(numeric)}" if numeric else ""
    return DataError(f"{message}: {what}; {advice}{example}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_csv(raw: bytes, target: str, features: list[str] | None, source: str) -> Dataset:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text ({e})") from e
    delimiter = detect_delimiter(text)
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    if not rows:
        raise DataError(f"{source}: the file is empty")
    header = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    if len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise DataError(f"{source}: duplicate column names: {dupes}")
    if target not in header:
        raise DataError(f"{source}: target column {target!r} not found; columns are {header}"
                        + _separator_hint(header))
    chosen = features is not None
    if features is None:
        features = [h for h in header if h != target]
    missing = [f for f in features if f not in header]
    if missing:
        raise DataError(f"{source}: feature columns not found: {missing}; columns are {header}"
                        + _separator_hint(header))
    if target in features:
        raise DataError(f"{source}: the target column {target!r} cannot also be a feature")
    if not features:
        raise DataError(f"{source}: no feature columns")
    if not body:
        raise DataError(f"{source}: no data rows")

    col = {name: i for i, name in enumerate(header)}
    x = np.empty((len(body), len(features)), dtype=np.float64)
    labels: list[str] = []
    for r, row in enumerate(body):
        line = r + 2  # 1-based, after the header
        if len(row) != len(header):
            raise DataError(
                f"{source}: line {line} has {len(row)} fields, the header has {len(header)}"
            )
        for j, name in enumerate(features):
            cell = row[col[name]].strip()
            try:
                value = float(cell)
            except ValueError:
                raise _not_a_number(source, line, name, cell, body, col, features, chosen,
                                    delimiter) from None
            if not math.isfinite(value):
                raise DataError(
                    f"{source}: line {line}, column {name!r}: {cell!r} is missing or not finite"
                )
            x[r, j] = value
        label = row[col[target]].strip()
        if not label:
            raise DataError(f"{source}: line {line}: the target {target!r} is empty")
        labels.append(label)

    classes = _class_order(labels)
    if len(classes) < 2:
        raise DataError(
            f"{source}: target {target!r} has {len(classes)} class(es); at least 2 are needed"
        )
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[v] for v in labels], dtype=np.int64)
    return Dataset(
        x=x,
        y=y,
        feature_names=tuple(features),
        class_names=tuple(classes),
        sha256=hashlib.sha256(raw).hexdigest(),
        source=source,
        delimiter=delimiter,
    )


def stratified_split(
    y: NDArray[np.int64], val_fraction: float, rng: np.random.Generator
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Train and validation row indices, with each class split in the same proportion."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be in (0, 1), got {val_fraction}")
    train: list[NDArray[np.int64]] = []
    val: list[NDArray[np.int64]] = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        if rows.size < 2:
            raise DataError(
                f"class index {int(c)} has {rows.size} example(s); each class needs at least 2"
            )
        rows = rng.permutation(rows)
        n_val = min(rows.size - 1, max(1, round(rows.size * val_fraction)))
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def standardisation(x: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-feature mean and std of the training rows; a constant feature gets std 1 so that
    standardising maps it to 0 rather than dividing by zero."""
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)
