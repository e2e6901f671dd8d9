"""A wide model where inference dominates: 256 inputs, four 1024-wide hidden layers, 2 classes.

Made with the project's own commands (bnserve-train, bnserve-export), so it is verified like any
other export. The data are synthetic: two Gaussian classes whose means differ along a random
direction. Cached under models/ (gitignored): delete models/wide.onnx to rebuild.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from model_export import export, train

N_FEATURES = 256
N_ROWS = 1500
HIDDEN = "1024,1024,1024,1024"
EPOCHS = 2


def write_data(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=N_ROWS)
    direction = rng.normal(size=N_FEATURES)
    x = rng.normal(size=(N_ROWS, N_FEATURES)) + np.outer(2 * y - 1, direction) * 0.1
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow([f"f{i:03d}" for i in range(N_FEATURES)] + ["label"])
        for row, label in zip(x, y, strict=True):
            out.writerow([f"{v:.6g}" for v in row] + [("a", "b")[label]])


def build(models: Path) -> Path:
    """models/wide.onnx, trained and exported unless it already exists."""
    onnx_path, ckpt = models / "wide.onnx", models / "wide.ckpt"
    if onnx_path.exists() and ckpt.exists():
        return onnx_path
    models.mkdir(parents=True, exist_ok=True)
    data = models / "wide.csv"
    write_data(data)
    if train.main(["--data", str(data), "--target", "label", "--hidden", HIDDEN,
                   "--epochs", str(EPOCHS), "--out", str(ckpt)]) != 0:
        raise SystemExit("training the wide model failed")
    if export.main(["--checkpoint", str(ckpt), "--out", str(onnx_path)]) != 0:
        raise SystemExit("exporting the wide model failed")
    return onnx_path


if __name__ == "__main__":
    print(build(Path("models")))
