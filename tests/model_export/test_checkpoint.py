"""The checkpoint round-trips every array, and one whose shapes do not fit is refused."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from model_export import checkpoint, export
from model_export.train import TrainResult


def _save(result: TrainResult, path: Path) -> Path:
    checkpoint.save(path, result.net, result.meta, result.x_val, result.y_val)
    return path


def test_round_trip_keeps_every_array_and_setting(
    default_result: TrainResult, tmp_path: Path
) -> None:
    net, meta, vx, vy = checkpoint.load(_save(default_result, tmp_path / "m.ckpt"))
    src = default_result.net
    assert set(net.params) == set(src.params)
    assert set(net.stats) == set(src.stats)
    for k in src.params:
        np.testing.assert_array_equal(net.params[k], src.params[k])
    for k in src.stats:
        np.testing.assert_array_equal(net.stats[k], src.stats[k])
    assert (net.eps, net.beta_avg, net.estimator) == (src.eps, src.beta_avg, src.estimator)
    assert meta["feature_names"] == default_result.meta["feature_names"]
    assert meta["figures"]["val_accuracy"] == default_result.meta["figures"]["val_accuracy"]
    assert (
        "weight of the old value" in meta["averaging"]
        or "weights the old value" in meta["averaging"]
    )
    np.testing.assert_array_equal(vx, default_result.x_val)
    np.testing.assert_array_equal(vy, default_result.y_val)


def _rewrite_array(path: Path, name: str, value: np.ndarray) -> None:
    with zipfile.ZipFile(path) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    buf = io.BytesIO()
    np.lib.format.write_array(buf, value)
    entries[f"arrays/{name}.npy"] = buf.getvalue()
    with zipfile.ZipFile(path, "w") as zf:
        for n, b in entries.items():
            zf.writestr(n, b)


def test_checkpoint_whose_shapes_do_not_fit_is_refused(
    default_result: TrainResult, tmp_path: Path
) -> None:
    path = _save(default_result, tmp_path / "m.ckpt")
    _rewrite_array(path, "hidden.1.gamma", np.ones(7))
    with pytest.raises(
        checkpoint.CheckpointError, match=r"'hidden.1.gamma' has shape \(7,\), expected \(16,\)"
    ):
        checkpoint.load(path)


def test_export_command_refuses_a_bad_checkpoint_and_writes_nothing(
    default_result: TrainResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _save(default_result, tmp_path / "m.ckpt")
    _rewrite_array(path, "hidden.0.weight", np.ones((29, 32)))
    out = tmp_path / "m.onnx"
    assert export.main(["--checkpoint", str(path), "--out", str(out)]) == 2
    assert "'hidden.0.weight' has shape (29, 32), expected (30, 32)" in capsys.readouterr().err
    assert not out.exists()


def test_missing_and_unreadable_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "none.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a zip")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable bnserve checkpoint"):
        checkpoint.load(tmp_path / "junk.ckpt")
