"""The toy users already have: FastAPI, a pydantic body, a sync endpoint, ONNX Runtime, dicts out.

Written the way a tutorial would: no custom response class, no validation beyond pydantic's.
"""

# No ``from __future__ import annotations``: FastAPI must see the request model made at run time.
import json
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel
from stack import serve


def request_model(rank: int) -> type[BaseModel]:
    """features: list[float] for [N, F] inputs, nested one level per further dimension."""
    features: Any = float
    for _ in range(rank - 1):
        features = list[features]

    class PredictRequest(BaseModel):
        __annotations__ = {"features": features}

    return PredictRequest


def make_app(model_path: str) -> FastAPI:
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    classes = json.loads(session.get_modelmeta().custom_metadata_map["class_names"])
    PredictRequest = request_model(len(session.get_inputs()[0].shape))
    app = FastAPI()

    @app.get("/readyz")
    def readyz() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/predict")
    def predict(req: PredictRequest) -> dict[str, object]:  # type: ignore[valid-type]
        x = np.array([req.features], dtype=np.float32)  # type: ignore[attr-defined]
        # by name: bnserve files also carry drift.* monitoring outputs, which a wrapper ignores
        probs, labels = session.run(["probabilities", "label"], {"features": x})
        k = int(labels[0])
        return {"class": classes[k], "class_index": k,
                "probabilities": dict(zip(classes, probs[0].tolist(), strict=True))}

    return app


if __name__ == "__main__":
    serve(make_app)
