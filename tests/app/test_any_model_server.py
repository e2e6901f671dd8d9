"""End to end: the real ``bnserve-serve`` serving an image classifier [N, 3, 8, 8] and a values
model [N, 5, 40] -> [N, 5, 40] (tests/app/conftest.py), over HTTP on 127.0.0.1 and a free port.

Answers equal ONNX Runtime run directly on the same float32 input, bit for bit, and the numpy
float64 forward from the weights within 1e-6 x max(1, max |reference|); a batch's answers equal
each example's alone, bit for bit; bad shapes and values get a 4xx naming the position, and the
server keeps answering."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import schemas

pytestmark = pytest.mark.slow

ContractModel = Any  # conftest.ContractModel
TOL = 1e-6


def nan_at(example: Any, index: tuple[int, ...]) -> bytes:
    x = np.array(example, dtype=object)
    x[index] = float("nan")
    return json.dumps({"features": x.tolist()}).encode()  # json writes NaN; orjson refuses


def bad_requests(model: ContractModel, good: list[Any]) -> list[tuple[str, bytes, int, str]]:
    """(path, body, status, words in the message) for the real server."""
    dims = model.input_shape
    cut = np.zeros(dims)[..., :-1].tolist()  # the last dimension one short
    return [
        ("/predict", json.dumps({"features": cut}).encode(), 422,
         f"expected shape {list(dims)}, got {[*dims[:-1], dims[-1] - 1]}"),
        ("/predict", nan_at(good, (1,) * len(dims)), 422, f"features{'[1]' * len(dims)} is NaN"),
        ("/predict", json.dumps({"features": [good[0], good[1][:-1], *good[2:]]}).encode(), 422,
         f"features[1] has {dims[1] - 1} values, expected {dims[1]}"),
        ("/predict/batch", json.dumps({"instances": [good, np.zeros(dims[1:]).tolist()]}).encode(),
         422, f"instances[1]: expected shape {list(dims)}, got {list(dims[1:])}"),
        ("/predict", json.dumps({"features": {"a": 1.0}}).encode(), 422,
         "by name only for models with 1-D"),
        ("/predict", b'{"features": [[[1, "2"]]]}', 422, "got [1, 1, 2]"),
        ("/predict", b"{", 400, "not valid JSON"),
    ]


def direct(model: ContractModel, x: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"features": x}), strict=True))


def outputs_of(model: ContractModel, answer: dict[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    if model.output_kind == "values":
        schemas.ValuesPrediction.model_validate(answer)
        return {"values": np.array(answer["values"], dtype=np.float32)}
    schemas.Prediction.model_validate(answer)
    probs = [answer["probabilities"][c] for c in model.class_names]
    return {"probabilities": np.array(probs, dtype=np.float32),
            "label": np.array(answer["class_index"])}


@pytest.mark.parametrize("name", ["image", "sequence"])
def test_real_server_serves_the_model_exactly_and_refuses_bad_shapes(
    start_server: Any, contract_models: dict[str, Any], name: str
) -> None:
    model = contract_models[name]
    server = start_server(model_path=model.path, max_body_bytes=1 << 20)
    server.wait_ready()
    x = model.examples(12, seed=5)
    runtime, reference = direct(model, x), model.forward(x)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        doc = schemas.ModelInfo.model_validate(http.get("/model").json())
        assert (doc.output_kind, doc.input_shape) == (model.output_kind, list(model.input_shape))
        assert (doc.feature_names, doc.class_names) == (None, model.class_names)
        assert doc.fold_report is not None
        assert doc.fold_report["batchnorms"] == 1

        alone = []
        for i, example in enumerate(x.tolist()):
            r = http.post("/predict", json={"features": example})
            assert r.status_code == 200, r.text
            alone.append(r.json())
            for key, value in outputs_of(model, r.json()).items():
                assert np.array_equal(value, runtime[key][i]), key
                atol = TOL * max(1.0, float(np.abs(reference[key][i]).max()))
                np.testing.assert_allclose(value, reference[key][i], rtol=0, atol=atol)
        r = http.post("/predict/batch", json={"instances": x.tolist()})
        assert r.status_code == 200
        assert r.json() == {"predictions": alone, "model_version": model.model_version}

        good = x[0].tolist()
        for path, content, status, words in bad_requests(model, good):
            r = http.post(path, content=content,
                          headers={"content-type": "application/json", "x-request-id": "bad-1"})
            assert r.status_code == status, (content[:80], r.text)
            error = schemas.ErrorResponse.model_validate(r.json()).error
            assert error.request_id == "bad-1"
            assert words in error.message, (words, error.message)
            assert error.expected
            assert http.post("/predict", json={"features": good}).json() == alone[0]

        metrics = http.get("/metrics").text
    counted = {s.labels["class"]: s.value
               for f in text_string_to_metric_families(metrics) for s in f.samples
               if s.name == "bnserve_predictions_total"}
    if model.output_kind == "classifier":
        assert sum(counted.values()) == 2 * len(x) + len(bad_requests(model, good))
        assert set(counted) == set(model.class_names)
    else:
        assert counted == {}  # no classes to count
    assert server.terminate() == 0
