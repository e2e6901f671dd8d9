"""Where ``bnserve-train`` and ``bnserve-export`` write by default, and when they may replace a
file.

Both name their output after their input, in ``models/``: ``--data my.csv`` trains
``models/my.ckpt``, ``--checkpoint models/my.ckpt`` exports ``models/my.onnx`` (without
``--data``, the shipped data trains ``models/default.ckpt``, which exports ``models/default.onnx``).

A file already there is replaced only when it holds an earlier version of the same model: made
from the same source (the same data file, or the same imported ONNX file's name) with the same
feature and class names. Retraining or re-exporting a model therefore just works, while another
model's file, or a file that is not a bnserve checkpoint or model, is refused unless ``--force``.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS_DIR = Path("models")
_FIXED_SOURCES = ("bnserve:", "onnx:")  # the shipped data; an imported file (no path to resolve)


def derived(source: Path, suffix: str) -> Path:
    """``models/<source's name without its extension><suffix>``."""
    return MODELS_DIR / f"{source.stem}{suffix}"


@dataclass(frozen=True)
class Origin:
    """What a checkpoint or model file was made from, and the interface it serves."""

    source: str  # a data file as given to --data, "bnserve:<shipped data>", or "onnx:<file name>"
    feature_names: tuple[str, ...] | None
    class_names: tuple[str, ...] | None

    def same_model(self, other: Origin) -> bool:
        return (
            _same_source(self.source, other.source)
            and self.feature_names == other.feature_names
            and self.class_names == other.class_names
        )

    def describe(self) -> str:
        parts = [f"made from {self.source or 'an unknown source'}"]
        if self.feature_names is not None:
            parts.append(f"{len(self.feature_names)} features")
        if self.class_names is not None:
            names = self.class_names
            parts.append(f"classes {'/'.join(names)}" if len(names) <= 6
                         else f"{len(names)} classes")
        return ", ".join(parts)


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    if not a or not b or a.startswith(_FIXED_SOURCES) or b.startswith(_FIXED_SOURCES):
        return False
    return Path(a).resolve() == Path(b).resolve()  # my.csv and ./my.csv are one file


def _names(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, str):
        value = json.loads(value)
    return None if value is None else tuple(str(v) for v in value)


def origin_of(meta: dict[str, Any]) -> Origin:
    """From a checkpoint's meta or an ONNX file's metadata_props (values as JSON text)."""
    source = str(meta.get("data_source") or meta.get("source") or "")
    if source.startswith("onnx:"):
        source = source.partition(" sha256 ")[0]  # the imported file's name, not its version
    return Origin(source, _names(meta.get("feature_names")), _names(meta.get("class_names")))


def checkpoint_origin(path: Path) -> Origin | None:
    """None when ``path`` is not a readable bnserve checkpoint."""
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("meta.json"))
        return origin_of(meta) if isinstance(meta, dict) else None
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, TypeError):
        return None


def model_origin(path: Path) -> Origin | None:
    """None when ``path`` is not an ONNX file with bnserve's metadata."""
    import onnx  # noqa: PLC0415 - bnserve-train does not need it

    try:
        model = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        return origin_of(props) if "format" in props else None
    except Exception:  # any unreadable file is "not a bnserve model"
        return None


def refusal(path: Path, new: Origin, kind: str, force: bool) -> str | None:
    """None if ``path`` may be written; else the message saying why not and what to do.
    ``kind`` is "checkpoint" or "model"."""
    if force or not path.exists():
        return None
    old = checkpoint_origin(path) if kind == "checkpoint" else model_origin(path)
    if old is not None and old.same_model(new):
        return None
    held = (f"holds another model ({old.describe()})" if old is not None
            else f"is not a bnserve {kind}")
    return (f"{path} already exists and {held}; the new {kind} would be {new.describe()}. "
            f"Write it elsewhere with --out, or replace {path} with --force")
