"""Real PyTorch networks (tests/fixtures/torch, made by its make_fixtures.py with torch 2.13.0,
eval mode, BatchNormalization kept) fold, and the folded graphs give PyTorch's own outputs.

The reference is what PyTorch computed (``<name>.torch_out.npy``), not ONNX Runtime's view of the
unfolded file. Tolerance: 1e-4 x max(1, max |torch output|), the one ``bnserve-export`` states;
ONNX Runtime on the unfolded files already differs from torch by up to 2.4e-6 (FIXTURES.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from model_export import export

FIXTURES = Path(__file__).parents[1] / "fixtures" / "torch"

# name -> (BatchNormalization nodes, folded where, left as Mul+Add)
EXPECTED: dict[str, tuple[int, dict[str, int], int]] = {
    "mlp_bn1d": (3, {"Gemm": 2, "following Gemm": 1}, 0),
    "conv1d": (2, {"Conv": 2}, 0),
    "conv2d": (3, {"Conv": 2, "Gemm": 1}, 0),
    "depthwise": (3, {"Conv": 3}, 0),
    "convtranspose_groups": (2, {"Conv": 1, "ConvTranspose": 1}, 0),
    "bn_affine_false": (1, {"Conv": 1}, 0),
    "bn_before_conv": (2, {"following Conv": 1}, 1),  # the second is in front of a padded Conv
    "resnet_basic": (9, {"Conv": 9}, 0),
}


def _export(tmp_path: Path, name: str, *args: str) -> tuple[int, Path]:
    out = tmp_path / f"{name}.onnx"
    status = export.main(["--from-onnx", str(FIXTURES / f"{name}.onnx"), "--out", str(out),
                          "--samples", str(FIXTURES / f"{name}.inputs.npy"), *args])
    return status, out


def _run(path: Path, x: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, {"features": x})]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_folded_fixture_gives_pytorchs_outputs(tmp_path: Path, name: str) -> None:
    status, out = _export(tmp_path, name, "--output-kind", "values")
    assert status == 0
    x = np.load(FIXTURES / f"{name}.inputs.npy")
    torch_out = np.load(FIXTURES / f"{name}.torch_out.npy").astype(np.float64)
    values, *_ = _run(out, x)  # then the drift.* monitoring outputs
    tol = 1e-4 * max(1.0, float(np.abs(torch_out).max()))
    assert values.shape == torch_out.shape
    assert float(np.abs(values - torch_out).max()) <= tol

    n_bn, into, left = EXPECTED[name]
    report = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}
                        ["fold_report"])
    assert report["batchnorms"] == n_bn
    assert report["into"] == into
    assert len(report["left"]) == left
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "BatchNormalization" not in ops


def test_bn_in_front_of_a_padded_conv_is_left_as_mul_add_and_says_why(tmp_path: Path) -> None:
    status, out = _export(tmp_path, "bn_before_conv", "--output-kind", "values")
    assert status == 0
    report = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}
                        ["fold_report"])
    (why,) = report["left"]
    assert "in front of a Conv that pads its input" in why
    assert "replaced by one per-channel Mul+Add" in why


def test_classifier_head_matches_pytorchs_softmax(tmp_path: Path) -> None:
    status, out = _export(tmp_path, "resnet_basic", "--classes-file",
                          str(_classes(tmp_path, 10)))
    assert status == 0
    x = np.load(FIXTURES / "resnet_basic.inputs.npy")
    z = np.load(FIXTURES / "resnet_basic.torch_out.npy").astype(np.float64)
    probs, labels, *_ = _run(out, x)
    expected = np.exp(z - z.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert float(np.abs(probs - expected).max()) <= 1e-4
    assert (labels == z.argmax(1)).all()


def _classes(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "classes.txt"
    path.write_text("".join(f"digit {i}\n" for i in range(n)))
    return path


def test_a_model_exported_in_training_mode_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = _export(tmp_path, "train_mode", "--samples", str(FIXTURES /
                                                                    "mlp_bn1d.inputs.npy"))
    err = capsys.readouterr().err
    assert status == 2
    assert not out.exists()
    assert "training" in err
    assert "call model.eval() before torch.onnx.export" in err
