"""The toy users already have: FastAPI, a pydantic body, a sync endpoint, ONNX Runtime, dicts out.

Written the way a tutorial would: no custom response class, no validation beyond pydantic's.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel
from stack import serve


class PredictRequest(BaseModel):
    features: list[float]


def make_app(model_path: str) -> FastAPI:
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    classes = json.loads(session.get_modelmeta().custom_metadata_map["class_names"])
    app = FastAPI()

    @app.get("/readyz")
    def readyz() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/predict")
    def predict(req: PredictRequest) -> dict[str, object]:
        x = np.array([req.features], dtype=np.float32)
        probs, labels = session.run(None, {"features": x})
        k = int(labels[0])
        return {"class": classes[k], "class_index": k,
                "probabilities": dict(zip(classes, probs[0].tolist(), strict=True))}

    return app


if __name__ == "__main__":
    serve(make_app)
