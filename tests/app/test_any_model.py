"""Serving any model that follows the export contract, in-process (TestClient runs the lifespan):
an image classifier [N, 3, 8, 8], a values model [N, 5, 40] -> [N, 5, 40] and a 1-D regression
[N, 6] -> [N] (tests/app/conftest.py builds them with onnx.helper from known weights).

References: ONNX Runtime run directly on the same float32 input (must be equal, bit for bit), and
the numpy float64 forward computed from the weights, within 1e-6 x max(1, max |reference|)
(float32 accumulation over at most 40 terms; measured: 3.5e-7 on probabilities, 1.3e-6 on values
of magnitude 7)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app import schemas
from app.lifecycle import load_model
from app.main import create_app
from app.settings import Settings
from tests.app.wire import post

ContractModel = Any  # conftest.ContractModel (conftest modules are not importable)
MODELS = ["image", "sequence", "regression"]
TOL = 1e-6  # times max(1, max |reference|)


@pytest.fixture(params=MODELS)
def model(request: pytest.FixtureRequest, contract_models: dict[str, Any]) -> ContractModel:
    return contract_models[request.param]


@pytest.fixture
def served(make_client: Any, model: ContractModel) -> TestClient:
    # 20 images of 192 numbers at full float32 precision are ~80 KB (the default is 1 MiB)
    client: TestClient = make_client(model_path=model.path, max_body_bytes=1 << 20)
    return client


def direct(model: ContractModel, x: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
    """ONNX Runtime on the file, with its default options: no bnserve code involved."""
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"features": x}), strict=True))


def answer_arrays(model: ContractModel, answer: dict[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    """A served answer as the model's outputs for one example."""
    if model.output_kind == "values":
        schemas.ValuesPrediction.model_validate(answer)
        return {"values": np.array(answer["values"], dtype=np.float32)}
    parsed = schemas.Prediction.model_validate(answer)
    assert list(parsed.probabilities) == model.class_names
    assert parsed.class_ == model.class_names[parsed.class_index]
    probs = np.array(list(parsed.probabilities.values()), dtype=np.float32)
    return {"probabilities": probs, "label": np.array(parsed.class_index)}


def assert_close(got: np.ndarray[Any, Any], ref: np.ndarray[Any, Any]) -> None:
    atol = TOL * max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=0, atol=atol)


def test_predictions_equal_onnxruntime_and_the_numpy_reference(
    served: TestClient, model: ContractModel
) -> None:
    x = model.examples(24)
    runtime, numpy_ref = direct(model, x), model.forward(x)
    for i in range(len(x)):
        r = served.post("/predict", json={"features": x[i].tolist()})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == model.model_version
        got = answer_arrays(model, r.json())
        for name, value in got.items():
            assert np.array_equal(value, runtime[name][i]), name  # bit for bit
            assert_close(value, numpy_ref[name][i])


def test_batch_answers_equal_each_example_alone_bitwise(
    served: TestClient, model: ContractModel
) -> None:
    examples = model.examples(20, seed=1).tolist()
    alone = [served.post("/predict", json={"features": e}).json() for e in examples]
    r = served.post("/predict/batch", json={"instances": examples})
    assert r.status_code == 200, r.text
    batch = r.json()
    schema = (schemas.BatchPrediction if model.output_kind == "classifier"
              else schemas.ValuesBatchPrediction)
    schema.model_validate(batch)
    assert batch == {"predictions": alone, "model_version": model.model_version}
    reverse = served.post("/predict/batch", json={"instances": examples[::-1]}).json()
    assert reverse["predictions"] == alone[::-1]
    one = served.post("/predict/batch", json={"instances": examples[:1]}).json()
    assert one["predictions"] == alone[:1]


def test_model_document_shows_kind_shape_names_and_fold_report(
    served: TestClient, model: ContractModel
) -> None:
    r = served.get("/model")
    assert r.status_code == 200
    doc = schemas.ModelInfo.model_validate(r.json())
    assert doc.output_kind == model.output_kind
    assert doc.input_shape == list(model.input_shape)
    assert doc.input.shape == ["N", *model.input_shape]
    assert doc.feature_names == model.feature_names
    assert doc.class_names == model.class_names
    assert doc.n_features == (None if model.feature_names is None else len(model.feature_names))
    assert doc.n_classes == (None if model.class_names is None else len(model.class_names))
    if model.name == "regression":  # a model bnserve-export did not fold: no report
        assert (doc.fold_report, doc.source) == (None, None)
    else:
        assert doc.fold_report is not None
        assert doc.fold_report["summary"].startswith("folded 1 of 1 BatchNormalization")
        assert doc.fold_report["into"] == {"Conv": 1}
        assert doc.source is not None
        assert doc.source.startswith("onnx:")
    assert [o.name for o in doc.outputs] == (
        ["probabilities", "label"] if model.output_kind == "classifier" else ["values"]
    )


def test_default_model_document_keeps_its_keys_and_gains_the_new_ones(
    client: TestClient,
) -> None:
    doc = client.get("/model").json()
    assert doc["output_kind"] == "classifier"
    assert doc["input_shape"] == [30]
    assert (doc["fold_report"], doc["source"]) == (None, None)
    assert len(doc["feature_names"]) == doc["n_features"] == 30
    assert len(doc["class_names"]) == doc["n_classes"] == 2


def test_one_d_values_model_takes_features_by_name(
    make_client: Any, contract_models: dict[str, Any]
) -> None:
    model = contract_models["regression"]
    client = make_client(model_path=model.path)
    x = model.examples(5, seed=2)
    for row in x:
        by_position = client.post("/predict", json={"features": row.tolist()})
        names = dict(zip(model.feature_names, row.tolist(), strict=True))
        by_name = client.post("/predict", json={"features": names})
        assert by_position.status_code == by_name.status_code == 200
        assert by_position.content == by_name.content
        assert isinstance(by_name.json()["values"], float)  # output [N]: one number each
    r = client.post("/predict", json={"features": {"x0": 1.0}})
    assert r.status_code == 422
    assert "missing feature(s) 'x1'" in r.json()["error"]["message"]


def test_non_finite_outputs_are_422_naming_the_instance(
    make_client: Any, contract_models: dict[str, Any]
) -> None:
    for name in ("image", "sequence"):
        model = contract_models[name]
        client = make_client(model_path=model.path)
        good = model.examples(2).tolist()
        huge = np.full(model.input_shape, 3.0e38).tolist()  # finite, but overflows inside
        r = client.post("/predict", json={"features": huge})
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert "overflow" in message
        r = client.post("/predict/batch", json={"instances": [*good, huge]})
        assert r.status_code == 422
        assert r.json()["error"]["message"].startswith("instances[2]: these ")
        assert client.post("/predict", json={"features": good[0]}).status_code == 200


def scrape(client: TestClient) -> dict[str, float]:
    """name{labels} -> value, for the samples of our own metrics."""
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name.startswith("bnserve_"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_metrics_count_predictions_per_class_only_for_classifiers(
    make_client: Any, contract_models: dict[str, Any]
) -> None:
    image = contract_models["image"]
    client = make_client(model_path=image.path)
    examples = image.examples(30, seed=3)
    classes = [client.post("/predict", json={"features": e.tolist()}).json()["class"]
               for e in examples]
    m = scrape(client)
    assert len(set(classes)) == 3  # every class occurs: the counts below mean something
    for c in image.class_names:
        assert m[f"bnserve_predictions_total{{class={c}}}"] == classes.count(c)

    values = contract_models["sequence"]
    client = make_client(model_path=values.path)
    for e in values.examples(4):
        assert client.post("/predict", json={"features": e.tolist()}).status_code == 200
    m = scrape(client)
    assert not any(k.startswith("bnserve_predictions_total") for k in m)
    assert m["bnserve_requests_total{route=/predict,status=200}"] == 4
    assert m["bnserve_inference_duration_seconds_count{}"] == 4


@pytest.mark.parametrize("name", ["image", "sequence"])
def test_adaptive_batching_answers_are_the_bytes_each_example_gets_alone(
    contract_models: dict[str, Any], name: str
) -> None:
    model = contract_models[name]
    bodies = [orjson.dumps({"features": e.tolist()}) for e in model.examples(40, seed=4)]

    async def run() -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]], float]:
        batched = create_app(Settings(model_path=model.path, batching=True, log_level="warning"))
        await load_model(batched.rt)
        together = await asyncio.gather(*(post(batched, "/predict", b) for b in bodies))
        plain = create_app(Settings(model_path=model.path, log_level="warning"))
        await load_model(plain.rt)
        alone = [await post(plain, "/predict", b) for b in bodies]
        runs = next(s.value for f in text_string_to_metric_families(
            batched.metrics.render().decode()) for s in f.samples
            if s.name == "bnserve_batch_size_count")
        return list(together), alone, runs

    together, alone, runs = asyncio.run(run())
    assert [s for s, _ in together] == [200] * len(bodies)
    assert together == alone
    assert runs < len(bodies) / 4  # examples really shared runs
