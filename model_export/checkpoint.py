"""The training checkpoint: one zip file with ``meta.json`` and one ``.npy`` per array.

Written with fixed timestamps and sorted entries, so the same training run gives the same bytes.
Loading checks every shape against the metadata and refuses a checkpoint that does not fit.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from model_export.batchnorm import Array
from model_export.mlp import ESTIMATORS, Network

FORMAT = "bnserve-checkpoint/1"
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest date: no wall-clock time in the file


class CheckpointError(ValueError):
    """The checkpoint is missing, unreadable, or its contents do not fit together."""


def save(
    path: str | Path,
    net: Network,
    meta: dict[str, Any],
    verify_x: Array,
    verify_y: NDArray[np.int64],
) -> None:
    """``meta`` carries names, data checksum, training figures; ``verify_*`` is the validation set
    that export checks the ONNX file against."""
    arrays = {**net.params, **net.stats, "verify.x": verify_x, "verify.y": verify_y}
    full_meta = {
        **meta,
        "format": FORMAT,
        "eps": net.eps,
        "beta_avg": net.beta_avg,
        "estimator": net.estimator,
        "hidden": [int(net.params[f"hidden.{l}.gamma"].shape[0]) for l in range(net.n_hidden)],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        _write(zf, "meta.json", json.dumps(full_meta, indent=2, sort_keys=True).encode())
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            _write(zf, f"arrays/{name}.npy", buf.getvalue())


def _write(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def load(path: str | Path) -> tuple[Network, dict[str, Any], Array, NDArray[np.int64]]:
    """Returns ``(network, meta, verify_x, verify_y)``; raises CheckpointError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("meta.json"))
            arrays = {
                n[len("arrays/") : -len(".npy")]: np.lib.format.read_array(
                    io.BytesIO(zf.read(n)), allow_pickle=False
                )
                for n in zf.namelist()
                if n.startswith("arrays/") and n.endswith(".npy")
            }
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable bnserve checkpoint ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    net = _network(arrays, meta, path)
    return net, meta, arrays["verify.x"], arrays["verify.y"].astype(np.int64)


def _network(arrays: dict[str, NDArray[Any]], meta: dict[str, Any], path: Path) -> Network:
    hidden = [int(h) for h in meta["hidden"]]
    n_features = len(meta["feature_names"])
    n_classes = len(meta["class_names"])
    expected: dict[str, tuple[int, ...]] = {
        "input.mean": (n_features,),
        "input.std": (n_features,),
        "output.weight": (hidden[-1] if hidden else n_features, n_classes),
        "output.bias": (n_classes,),
    }
    n_in = n_features
    for l, n_out in enumerate(hidden):
        expected[f"hidden.{l}.weight"] = (n_in, n_out)
        for k in ("gamma", "beta", "running_mean", "running_var"):
            expected[f"hidden.{l}.{k}"] = (n_out,)
        if meta["estimator"] == "population" or f"hidden.{l}.population_mean" in arrays:
            expected[f"hidden.{l}.population_mean"] = (n_out,)
            expected[f"hidden.{l}.population_var"] = (n_out,)
        n_in = n_out
    for name, shape in expected.items():
        if name not in arrays:
            raise CheckpointError(f"{path}: array {name!r} is missing")
        if arrays[name].shape != shape:
            raise CheckpointError(
                f"{path}: array {name!r} has shape {arrays[name].shape}, expected {shape} "
                f"(from {n_features} features, hidden {hidden}, {n_classes} classes)"
            )
    if "verify.x" not in arrays or arrays["verify.x"].shape[1:] != (n_features,):
        raise CheckpointError(
            f"{path}: validation set 'verify.x' is missing or not (n, {n_features})"
        )
    if meta["estimator"] not in ESTIMATORS:
        raise CheckpointError(f"{path}: unknown estimator {meta['estimator']!r}")
    for l in range(len(hidden)):
        for k in ("running_var", "population_var"):
            v = arrays.get(f"hidden.{l}.{k}")
            if v is not None and (v < 0).any():
                raise CheckpointError(f"{path}: {k} of layer {l} has negative entries")
    params = {
        k: v for k, v in arrays.items() if k.startswith(("hidden.", "output.")) and _is_param(k)
    }
    stats = {
        k: v for k, v in arrays.items() if k.startswith(("input.", "hidden.")) and not _is_param(k)
    }
    return Network(
        params=params,
        stats=stats,
        eps=float(meta["eps"]),
        beta_avg=float(meta["beta_avg"]),
        estimator=meta["estimator"],
    )


def _is_param(name: str) -> bool:
    return name.endswith((".weight", ".gamma", ".beta", ".bias"))
