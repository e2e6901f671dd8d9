"""What /predict and /predict/batch answer, in-process (TestClient runs the lifespan)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from app import schemas

TOL = 1e-6  # absolute, on probabilities: float32 ONNX Runtime vs the float64 numpy reference
Trained = Any  # conftest.Trained


def features_body(row: Any) -> dict[str, Any]:
    return {"features": [float(v) for v in row]}


def test_single_predictions_equal_numpy_reference_on_validation_set(
    client: TestClient, trained: Trained
) -> None:
    ref = trained.reference(trained.x_val)
    for i, row in enumerate(trained.x_val):
        r = client.post("/predict", json=features_body(row))
        assert r.status_code == 200, r.text
        answer = schemas.Prediction.model_validate(r.json())
        probs = np.array([answer.probabilities[c] for c in trained.class_names])
        assert list(answer.probabilities) == trained.class_names
        np.testing.assert_allclose(probs, ref[i], rtol=0, atol=TOL)
        assert answer.class_index == int(ref[i].argmax())
        assert answer.class_ == trained.class_names[answer.class_index]
        assert answer.model_version == trained.model_version


def test_served_probabilities_are_the_exact_float32_values(
    client: TestClient, trained: Trained
) -> None:
    row = trained.x_val[0]
    probs = client.post("/predict", json=features_body(row)).json()["probabilities"]
    values = [probs[c] for c in trained.class_names]
    assert values == [float(np.float32(v)) for v in values]  # lossless float32 -> JSON
    assert abs(sum(values) - 1.0) < 1e-6


def test_features_by_name_in_any_order_equal_features_by_position(
    client: TestClient, trained: Trained
) -> None:
    rng = random.Random(0)
    for row in trained.x_val[:40]:
        by_name = dict(zip(trained.feature_names, (float(v) for v in row), strict=True))
        shuffled = dict(rng.sample(sorted(by_name.items()), len(by_name)))
        a = client.post("/predict", json=features_body(row))
        b = client.post("/predict", json={"features": shuffled})
        assert a.status_code == b.status_code == 200
        assert a.content == b.content


def test_integer_feature_values_are_accepted_as_numbers(
    client: TestClient, trained: Trained
) -> None:
    row = np.round(trained.x_val[1])
    as_ints = client.post("/predict", json={"features": [int(v) for v in row]})
    as_floats = client.post("/predict", json={"features": [float(v) for v in row]})
    assert as_ints.status_code == 200
    assert as_ints.content == as_floats.content


def test_batch_answers_are_identical_to_single_answers_on_validation_set(
    client: TestClient, trained: Trained
) -> None:
    rows = [[float(v) for v in row] for row in trained.x_val]
    singles = [client.post("/predict", json={"features": row}).json() for row in rows]
    r = client.post("/predict/batch", json={"instances": rows})
    assert r.status_code == 200, r.text
    batch = r.json()
    schemas.BatchPrediction.model_validate(batch)
    assert batch["model_version"] == trained.model_version
    assert len(batch["predictions"]) == len(rows)
    assert batch["predictions"] == singles  # bit-identical floats, same classes

    # the same with every other instance given by name, and the batch reversed
    named = [dict(zip(trained.feature_names, row, strict=True)) if i % 2 else row
             for i, row in enumerate(rows)]
    r = client.post("/predict/batch", json={"instances": named[::-1]})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == singles[::-1]


def test_batch_of_one_equals_single(client: TestClient, trained: Trained) -> None:
    row = [float(v) for v in trained.x_val[5]]
    single = client.post("/predict", json={"features": row}).json()
    batch = client.post("/predict/batch", json={"instances": [row]}).json()
    assert batch == {"predictions": [single], "model_version": trained.model_version}


def test_batch_up_to_the_configured_maximum_is_served(
    make_client: object, trained: Trained
) -> None:
    client = make_client(max_batch=7)  # type: ignore[operator]
    rows = [[float(v) for v in row] for row in trained.x_val[:7]]
    r = client.post("/predict/batch", json={"instances": rows})
    assert r.status_code == 200
    assert len(r.json()["predictions"]) == 7


def test_extreme_finite_inputs_get_finite_answers_or_a_clear_422_never_nan(
    client: TestClient, trained: Trained
) -> None:
    row = [float(v) for v in trained.x_val[0]]
    row[3] = 3.0e38  # near float32's largest finite value: valid, and this model copes
    r = client.post("/predict", json={"features": row})
    assert r.status_code == 200, r.text
    assert all(np.isfinite(list(r.json()["probabilities"].values())))

    # all features at -3e38 overflow inside the network: ONNX Runtime returns NaN
    huge = [-3.0e38] * len(row)
    r = client.post("/predict", json={"features": huge})
    assert r.status_code == 422, r.text
    assert "overflow" in r.json()["error"]["message"]
    r = client.post("/predict/batch", json={"instances": [row, row, huge]})
    assert r.status_code == 422
    assert r.json()["error"]["message"].startswith("instances[2]: ")
    assert client.post("/predict", json={"features": row}).status_code == 200
