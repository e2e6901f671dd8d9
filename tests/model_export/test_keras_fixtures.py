"""Keras models converted with tf2onnx (tests/fixtures/keras, made by its make_fixtures.py with
TensorFlow 2.21 and tf2onnx 1.17) import, and give Keras' own outputs.

Keras 3 reaches ONNX with its batch norms already written as constant Mul/Add (tf2onnx folds
them), Keras 2 (tf_keras) with a BatchNormalization left in front of a padded Conv; a model
converted while called with training=True computes batch statistics with ReduceMean and must be
refused with the fix. Tolerance: 1e-4 x max(1, max |Keras output|), as bnserve-export states.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from model_export import export

FIXTURES = Path(__file__).parents[1] / "fixtures" / "keras"


def _export(tmp_path: Path, name: str, samples: str, *args: str) -> tuple[int, Path]:
    out = tmp_path / f"{name}.onnx"
    status = export.main(["--from-onnx", str(FIXTURES / f"{name}.onnx"), "--out", str(out),
                          "--samples", str(FIXTURES / f"{samples}.inputs.npy"), *args])
    return status, out


@pytest.mark.parametrize(("name", "left"), [("keras_cnn", 0), ("tf_keras_cnn", 1)])
def test_converted_keras_model_gives_keras_outputs(tmp_path: Path, name: str, left: int) -> None:
    status, out = _export(tmp_path, name, name, "--output-kind", "values")
    assert status == 0
    x = np.load(FIXTURES / f"{name}.inputs.npy")
    keras_out = np.load(FIXTURES / f"{name}.keras_out.npy").astype(np.float64)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    values, *_ = sess.run(None, {"features": x})  # then the drift.* outputs
    assert float(np.abs(values - keras_out).max()) <= 1e-4 * max(1.0, np.abs(keras_out).max())
    report = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}
                        ["fold_report"])
    assert report["batchnorms"] == left
    assert len(report["left"]) == left  # Keras 2's one BN is in front of a padded Conv


def test_a_model_converted_in_training_mode_is_refused_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = _export(tmp_path, "keras_training", "keras_cnn")
    err = capsys.readouterr().err
    assert status == 2
    assert not out.exists()
    assert "each example's answer depends on the other examples in its batch" in err
    assert "training=False" in err
