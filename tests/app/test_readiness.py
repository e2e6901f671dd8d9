"""Readiness and model loading: ready only once loaded, checked and warm; a bad model file keeps
the service unready with a clear reason (or fails fast), and never serves."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import helper

from app import schemas
from app.main import create_app
from app.predictor import Predictor
from app.settings import Settings

ROW = [float(v) for v in np.linspace(0.5, 30.5, 30)]


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_readyz_is_503_until_warm_up_has_run_then_200(
    make_client: Any, monkeypatch: pytest.MonkeyPatch, trained: Any
) -> None:
    release = threading.Event()
    warm_up = Predictor.warm_up

    def held_warm_up(self: Predictor, max_batch: int) -> None:
        assert release.wait(10)
        warm_up(self, max_batch)

    monkeypatch.setattr(Predictor, "warm_up", held_warm_up)
    client = make_client(ready=False)
    wait_for(lambda: client.get("/readyz").json()["reason"] == "warming up")

    r = client.get("/readyz")
    assert r.status_code == 503
    assert schemas.Readiness.model_validate(r.json()).ready is False
    assert client.get("/livez").status_code == 200  # alive while not ready
    r = client.post("/predict", json={"features": ROW})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert "the model is not ready: warming up" in r.json()["error"]["message"]
    assert client.get("/model").status_code == 503

    release.set()
    wait_for(lambda: client.get("/readyz").status_code == 200)
    body = client.get("/readyz").json()
    assert body == {"ready": True, "reason": "ready", "model_version": trained.model_version}
    assert client.post("/predict", json={"features": ROW}).status_code == 200


def test_readiness_turns_503_when_shutdown_begins(make_client: Any) -> None:
    client = make_client()
    app = client.app
    assert client.get("/readyz").status_code == 200
    app.rt.readiness.begin_shutdown()  # what the SIGTERM hook and the lifespan's end do
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["reason"] == "shutting down"
    # requests still in flight (or arriving while a load balancer catches up) are served
    assert client.post("/predict", json={"features": ROW}).status_code == 200


def _modified(model_bytes: bytes, change: Any) -> bytes:
    model = onnx.load_from_string(model_bytes)
    change(model)
    data: bytes = model.SerializeToString()
    return data


def _set_meta(key: str, value: str) -> Any:
    def change(model: onnx.ModelProto) -> None:
        for prop in model.metadata_props:
            if prop.key == key:
                prop.value = value

    return change


def _rename_input(model: onnx.ModelProto) -> None:
    model.graph.input[0].name = "x"
    for node in model.graph.node:
        node.input[:] = ["x" if i == "features" else i for i in node.input]


def _drop_label(model: onnx.ModelProto) -> None:
    del model.graph.output[1]


def _no_softmax(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.op_type == "Softmax":
            node.CopyFrom(helper.make_node("Identity", ["logits"], ["probabilities"]))


BAD_MODELS = [
    ("missing", None, "does not exist"),
    ("empty file", lambda b: b"", "not a loadable ONNX model"),
    ("corrupt bytes", lambda b: bytes(range(256)) * 8, "not a loadable ONNX model"),
    ("truncated", lambda b: b[: len(b) // 2], "not a loadable ONNX model"),
    ("not bnserve format", lambda b: _modified(b, _set_meta("format", "other/1")),
     "metadata format is 'other/1'"),
    ("feature names disagree with input", lambda b: _modified(
        b, _set_meta("feature_names", '["a", "b"]')), "has 30 features but metadata"),
    ("class names not a list", lambda b: _modified(b, _set_meta("class_names", '"benign"')),
     "'class_names' must be a JSON list"),
    ("input renamed", lambda b: _modified(b, _rename_input),
     "has the wrong interface: inputs are ['x'], expected exactly ['features']"),
    ("label output missing", lambda b: _modified(b, _drop_label), "output 'label' is missing"),
    ("probabilities are logits", lambda b: _modified(b, _no_softmax),
     "failed the warm-up check: probabilities are not all finite and within [0, 1]"),
]


@pytest.mark.parametrize(("make", "reason"), [(m, r) for _, m, r in BAD_MODELS],
                         ids=[i for i, _, _ in BAD_MODELS])
def test_bad_model_keeps_service_unready_with_reason_and_log_line(
    trained: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, make: Any, reason: str
) -> None:
    path = tmp_path / "model.onnx"
    if make is not None:
        path.write_bytes(make(trained.model_bytes))
    caplog.set_level(logging.INFO, logger="bnserve")
    with TestClient(create_app(Settings(model_path=path))) as client:
        wait_for(lambda: client.get("/readyz").json()["reason"].startswith("model not loaded"))
        r = client.get("/readyz")
        assert r.status_code == 503
        assert reason in r.json()["reason"]
        assert client.get("/livez").status_code == 200
        r = client.post("/predict", json={"features": ROW})
        assert r.status_code == 503  # never garbage
        assert reason in r.json()["error"]["message"]
        assert client.get("/model").status_code == 503
        time.sleep(0.05)
        assert client.get("/readyz").status_code == 503  # and it stays that way
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert reason in errors[0].getMessage()
    assert "stays unready" in errors[0].getMessage()


def test_fail_fast_aborts_startup_on_a_bad_model(tmp_path: Path) -> None:
    app = create_app(Settings(model_path=tmp_path / "missing.onnx", fail_fast=True))
    with pytest.raises(RuntimeError, match="does not exist"), TestClient(app):
        pass


def test_fail_fast_with_a_good_model_is_ready_on_start(trained: Any) -> None:
    app = create_app(Settings(model_path=trained.path, fail_fast=True))
    with TestClient(app) as client:  # no waiting: start-up only finishes once the model is warm
        assert client.get("/readyz").status_code == 200
