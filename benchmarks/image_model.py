"""An image model where a request carries ~3k numbers: the small ResNet that PyTorch exported for
the tests (tests/fixtures/torch/resnet_basic.onnx: 3x32x32 input, 9 batch norms, 10 classes),
folded and verified by ``bnserve-export --from-onnx``. Cached under models/ (gitignored).

``time_split`` measures, in-process, where a request's time goes: JSON parsing of the body, the
checks and conversion to float32, the ONNX Runtime run, and the JSON answer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from app.predictor import Predictor
from app.settings import Settings
from app.state import Model
from model_export import export

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "torch"
CLASSES = ",".join(f"class_{i}" for i in range(10))


def build(models: Path) -> Path:
    """models/image.onnx, imported unless it already exists."""
    out = models / "image.onnx"
    if out.exists():
        return out
    status = export.main(["--from-onnx", str(FIXTURE / "resnet_basic.onnx"), "--out", str(out),
                          "--samples", str(FIXTURE / "resnet_basic.inputs.npy"),
                          "--classes", CLASSES])
    if status != 0:
        raise SystemExit("importing the image model failed")
    return out


def rows() -> list[bytes]:
    """The fixture's 8 images as request bodies, every float32 value written in full."""
    x = np.load(FIXTURE / "resnet_basic.inputs.npy")
    return [orjson.dumps({"features": image.tolist()}) for image in x]


def _median_us(fn: Any, arg: Any, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e6


def time_split(model_path: Path, bodies: list[bytes], n: int = 300) -> dict[str, float]:
    """Median microseconds per step of one /predict request, in-process, bnserve's own code."""
    intra, inter = Settings(workers=1).threads()
    predictor = Predictor.load(model_path, intra, inter)
    model = Model.of(predictor, 256)
    body = bodies[0]
    doc = orjson.loads(body)
    x = model.single(doc)
    outputs = predictor.predict(x)
    return {
        "body_bytes": len(body),
        "numbers": int(x.size),
        "json_parse_us": _median_us(orjson.loads, body, n),
        "decode_us": _median_us(model.single, doc, n),
        "inference_us": _median_us(predictor.predict, x, n),
        "answer_us": _median_us(lambda o: model.answer(o, False), outputs, n),
    }


if __name__ == "__main__":
    path = build(Path("models"))
    print(path, time_split(path, rows()))
