"""Drift monitoring in the predictor and the service, in-process: monitoring outputs declared in
``drift_reference`` are checked at load and warm-up, hidden from clients, run beside the answer
when monitoring is on, and every protocol's valid rows (and only those) reach the monitor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper

from app import reload, schemas
from app.predictor import ModelError, Predictor
from tests.app.conftest import ContractModel, MakeClient, Trained, conv_reference

Change = Callable[[onnx.ModelProto], None]
CONV_CHANNELS = 4  # the image classifier's Conv (tests/app/conftest.py)


def _group(name: str, kind: str, tensor: str, channels: int) -> dict[str, Any]:
    return {"name": name, "kind": kind, "tensor": tensor, "channel_names": None,
            "mean": [0.0] * channels, "std": [1.0] * channels}


def _meta(model: onnx.ModelProto, props: dict[str, str | None]) -> None:
    kept = {p.key: p.value for p in model.metadata_props}
    kept.update(props)
    del model.metadata_props[:]
    helper.set_model_props(model, {k: v for k, v in kept.items() if v is not None})


def watched(reference: Any = "default", output: str = "drift.conv", op: str = "Identity",
            shape: list[Any] | None = None, extra: list[onnx.NodeProto] | None = None) -> Change:
    """The image classifier with its Conv output ``c`` (through ``op``) as a monitoring output,
    and ``reference`` (default: an input group and a conv group) as drift_reference."""
    if reference == "default":
        reference = {"format": "bnserve-drift/1", "groups": [
            _group("input", "input", "features", 3),
            _group("conv", "batchnorm", "drift.conv", CONV_CHANNELS)]}

    def change(model: onnx.ModelProto) -> None:
        g = model.graph
        g.node.append(helper.make_node(op, ["c"], [output]))
        g.node.extend(extra or [])
        g.output.append(helper.make_tensor_value_info(
            output, TensorProto.FLOAT, shape if shape is not None else ["N", CONV_CHANNELS, 8, 8]))
        _meta(model, {"drift_reference": None if reference is None else
                      reference if isinstance(reference, str) else json.dumps(reference)})

    return change


def batch_centred(model: onnx.ModelProto) -> None:
    """drift.conv = c - its mean over the batch: a monitoring output that depends on the batch."""
    watched(output="drift.conv", op="Identity")(model)
    g = model.graph
    g.node[-1].output[:] = ["c.id"]
    g.node.extend([helper.make_node("ReduceMean", ["c.id"], ["c.bm"], axes=[0], keepdims=1),
                   helper.make_node("Sub", ["c.id", "c.bm"], ["drift.conv"])])


def changed(model: ContractModel, change: Change, path: Path) -> Path:
    proto = onnx.load(model.path)
    change(proto)
    path.write_bytes(proto.SerializeToString())
    return path


BAD: list[tuple[str, Change, str]] = [
    ("monitoring output without a reference", watched(reference=None),
     "outputs ['drift.conv'] are monitoring outputs (drift.*) but metadata 'drift_reference' "
     "is missing"),
    ("monitoring output not declared", watched(output="drift.other"),
     "outputs ['drift.other'] are monitoring outputs (drift.*) not declared"),
    ("reference not JSON", watched(reference="{oops"), "metadata drift_reference: not valid JSON"),
    ("reference of another format", watched(reference={"format": "x/2", "groups": []}),
     "'format' must be 'bnserve-drift/1'"),
    ("declared output missing", watched(reference={"format": "bnserve-drift/1", "groups": [
        _group("conv", "batchnorm", "drift.conv", 4), _group("bn", "batchnorm", "drift.bn", 2)]}),
     "group 'bn' watches output 'drift.bn', which the graph does not have"),
    ("declared channels differ", watched(reference={"format": "bnserve-drift/1", "groups": [
        _group("conv", "batchnorm", "drift.conv", 5)]}),
     "output 'drift.conv' is float32 ['N', 4, 8, 8], expected float32 [N, 5, ...]"),
    ("input group of the wrong width", lambda m: _meta(m, {"drift_reference": json.dumps({
        "format": "bnserve-drift/1", "groups": [_group("input", "input", "features", 2)]})}),
     "group 'input' watches 'features' with 2 channels; the input is 'features' with 3"),
    ("monitoring output depends on the batch", batch_centred,
     "failed the warm-up check: example 0 gives a different answer alone than inside a batch"),
    ("monitoring output not finite", watched(op="Log"),
     "failed the warm-up check: monitoring output 'drift.conv' is not all finite"),
]


@pytest.mark.parametrize(("change", "reason"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_model_with_bad_monitoring_outputs_is_refused_with_the_reason(
    image_model: ContractModel, tmp_path: Path, change: Change, reason: str
) -> None:
    path = changed(image_model, change, tmp_path / "bad.onnx")
    with pytest.raises(ModelError) as err:
        Predictor.load(path).warm_up(max_batch=16)
    assert reason in str(err.value)


def test_monitoring_outputs_are_hidden_and_computed_in_the_same_run(
    image_model: ContractModel, tmp_path: Path
) -> None:
    predictor = Predictor.load(changed(image_model, watched(), tmp_path / "w.onnx"))
    predictor.warm_up(16)
    info = predictor.info
    assert [o.name for o in info.outputs] == ["probabilities", "label"]
    assert [o.name for o in info.monitoring_outputs] == ["drift.conv"]
    assert info.drift is not None
    x = image_model.examples(5, seed=3)
    outputs, seen = predictor.predict_watched(x)
    fast_outputs, in_order = predictor.run_watched(x)  # the request path's form of the same
    assert info.drift.watched == ("features", "drift.conv")
    assert in_order[0] is x
    assert np.array_equal(in_order[1], seen["drift.conv"])
    assert all(np.array_equal(a, b) for a, b in zip(fast_outputs, outputs, strict=True))
    for a, b in zip(outputs, predictor.predict(x), strict=True):
        assert np.array_equal(a, b)
    assert seen["features"] is x
    # float32 Conv against the float64 reference: a few ulps of sums of 27 products
    np.testing.assert_allclose(seen["drift.conv"], conv_reference(x, *_conv(image_model), pad=1),
                               rtol=1e-4, atol=1e-5)


def _conv(model: ContractModel) -> tuple[Any, Any]:
    graph = onnx.load(model.path).graph
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    return weights["conv.W"], weights["conv.B"]


def _ewma(values: np.ndarray[Any, Any], tau: float) -> tuple[Any, Any]:
    """Bias-corrected EWMA of per-example channel means and mean squares: (mean, variance)."""
    a = 1.0 / tau
    m = s = w = 0.0
    for v in values.astype(np.float64):
        flat = v.reshape(v.shape[0], -1)
        m = (1 - a) * m + a * flat.mean(axis=1)
        s = (1 - a) * s + a * (flat**2).mean(axis=1)
        w = (1 - a) * w + a
    return m / w, s / w - (m / w) ** 2


def test_image_rows_from_every_protocol_reach_the_monitor(
    image_model: ContractModel, tmp_path: Path, make_client: MakeClient
) -> None:
    path = changed(image_model, watched(), tmp_path / "w.onnx")
    client = make_client(model_path=path, drift_time_constant=50, drift_sample_every=1)
    doc = client.get("/model").json()
    assert [o["name"] for o in doc["outputs"]] == ["probabilities", "label"]
    assert doc["drift"] == {"monitoring": True, "time_constant": 50.0, "sample_every": 1,
                            "groups": [
        {"name": "input", "kind": "input", "tensor": "features", "channels": 3,
         "skipped_channels": 0},
        {"name": "conv", "kind": "batchnorm", "tensor": "drift.conv", "channels": 4,
         "skipped_channels": 0}]}
    v2 = client.get("/v2/models/w").json()
    assert [o["name"] for o in v2["outputs"]] == ["probabilities", "label"]
    x = image_model.examples(12, seed=4)
    assert client.post("/predict", json={"features": x[0].tolist()}).status_code == 200
    assert client.post("/predict/batch", json={"instances": x[1:6].tolist()}).status_code == 200
    infer = {"inputs": [{"name": "features", "shape": [6, 3, 8, 8], "datatype": "FP32",
                         "data": x[6:].reshape(-1).tolist()}]}
    r = client.post("/v2/models/w/infer", json=infer)
    assert r.status_code == 200
    assert [o["name"] for o in r.json()["outputs"]] == ["probabilities", "label"]
    # refused before the data plane: never observed
    assert client.post("/predict/batch", json={"instances": [[1.0]]}).status_code == 422
    d = client.get("/drift", params={"top": 4}).json()
    assert d["examples"] == 12
    conv = next(g for g in d["groups"] if g["name"] == "conv")
    mean, var = _ewma(conv_reference(x, *_conv(image_model), pad=1), 50.0)
    by_channel = {c["channel"]: c for c in conv["worst"]}
    assert sorted(by_channel) == [0, 1, 2, 3]
    for c, got in by_channel.items():  # reference mean 0, std 1
        assert got["mean_shift"] == pytest.approx(abs(mean[c]), rel=1e-4, abs=1e-5)
        assert got["log_var_ratio"] == pytest.approx(np.log(var[c]), rel=1e-4, abs=1e-5)


def _served(client: TestClient, rows: np.ndarray[Any, Any]) -> None:
    for row in rows:
        assert client.post("/predict", json={"features": row.tolist()}).status_code == 200


def test_drift_report_equals_a_direct_ewma_of_the_served_rows(
    trained: Trained, make_client: MakeClient
) -> None:
    client = make_client(drift_time_constant=40, drift_min_examples=10,
                         drift_sample_every=1)
    rows = trained.x_val[:30].astype(np.float32)
    _served(client, rows[:20])
    assert client.post("/predict/batch", json={"instances": rows[20:].tolist()}).status_code == 200
    bad: list[dict[str, Any]] = [{"features": [1.0] * 3}, {"features": "x"},
                                 {"instances": [[1.0] * 31]}]
    for body in bad:
        route = "/predict/batch" if "instances" in body else "/predict"
        assert client.post(route, json=body).status_code == 422
    d = client.get("/drift", params={"top": 30}).json()
    schemas.Drift.model_validate(d)  # the answer is what the OpenAPI document says
    assert (d["model_version"], d["monitoring"], d["examples"]) == (
        trained.model_version, True, 30)
    assert d["time_constant"] == 40.0
    group = next(g for g in d["groups"] if g["name"] == "input")
    ref = json.loads(client.get("/model").json()["metadata"]["drift_reference"])["groups"][0]
    mean, var = _ewma(rows, 40.0)
    want_shift = np.abs(mean - ref["mean"]) / np.asarray(ref["std"])
    got = {c["channel"]: c for c in group["worst"]}
    for c in range(30):
        assert got[c]["name"] == trained.feature_names[c]
        assert got[c]["mean_shift"] == pytest.approx(want_shift[c], rel=1e-9, abs=1e-12)
        assert got[c]["log_var_ratio"] == pytest.approx(
            np.log(var[c] / ref["std"][c] ** 2), rel=1e-6, abs=1e-9)
    assert d["summary"]["worst_mean_shift"] == pytest.approx(
        max(g["worst_mean_shift"] for g in d["groups"]))
    metrics = client.get("/metrics").text
    assert "bnserve_drift_examples 30.0" in metrics
    name = trained.feature_names[0]
    line = next(l for l in metrics.splitlines()
                if l.startswith(f'bnserve_drift_feature_mean_shift{{feature="{name}"}}'))
    assert float(line.split()[-1]) == pytest.approx(want_shift[0], rel=1e-9)


def test_scores_stay_zero_in_metrics_until_enough_examples(
    trained: Trained, make_client: MakeClient
) -> None:
    client = make_client(drift_min_examples=1000, drift_sample_every=1)
    x = trained.x_val[:5].copy()
    x[:, 0] *= 10
    assert client.post("/predict/batch", json={"instances": x.tolist()}).status_code == 200
    assert client.get("/drift").json()["groups"][0]["worst_mean_shift"] > 1
    metrics = client.get("/metrics").text
    assert 'bnserve_drift_mean_shift{group="input"} 0.0' in metrics
    assert "bnserve_drift_examples 5.0" in metrics


def test_sampling_watches_every_kth_run(trained: Trained, make_client: MakeClient) -> None:
    client = make_client(drift_sample_every=3, drift_time_constant=600)
    _served(client, trained.x_val[:9])
    d = client.get("/drift").json()
    assert (d["examples"], d["time_constant"], d["sample_every"]) == (3, 600, 3)
    # the time constant stays in served examples: each watched one weighs 3/600
    assert client.app.rt.model.drift.time_constant == 200.0  # type: ignore[attr-defined]


def test_monitoring_off_runs_no_monitoring_outputs_and_says_so(
    trained: Trained, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(drift=False)
    model = client.app.rt.model  # type: ignore[attr-defined]
    assert model.drift is None

    def never(x: Any) -> Any:
        raise AssertionError("monitoring is off")

    monkeypatch.setattr(model.predictor, "run_watched", never)
    _served(client, trained.x_val[:3])
    r = client.get("/drift")
    assert r.status_code == 200
    assert r.json() == {"model_version": trained.model_version, "monitoring": False,
                        "reason": "drift monitoring is off (BNSERVE_DRIFT=false)"}
    schemas.Drift.model_validate(r.json())
    assert client.get("/model").json()["drift"]["monitoring"] is False
    assert "bnserve_drift_mean_shift{" not in client.get("/metrics").text


def _unwatched(model: onnx.ModelProto) -> None:
    """The trained model as a bnserve-export before issue 13 wrote it: no drift outputs."""
    keep = [o for o in model.graph.output if not o.name.startswith("drift.")]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    _meta(model, {"drift_reference": None})


def test_model_without_a_reference_is_served_unmonitored(
    trained: Trained, make_client: MakeClient, tmp_path: Path
) -> None:
    proto = onnx.load_from_string(trained.model_bytes)
    _unwatched(proto)
    path = tmp_path / "plain.onnx"
    path.write_bytes(proto.SerializeToString())
    client = make_client(model_path=path)
    _served(client, trained.x_val[:2])
    d = client.get("/drift").json()
    assert d["monitoring"] is False
    assert "no drift_reference" in d["reason"]
    assert client.get("/model").json()["drift"] is None


def test_drift_before_the_model_is_loaded_is_503(make_client: MakeClient, tmp_path: Path) -> None:
    client = make_client(ready=False, model_path=tmp_path / "missing.onnx")
    r = client.get("/drift")
    assert r.status_code == 503
    assert "error" in r.json()


def test_drift_top_out_of_range_is_422(client: TestClient) -> None:
    assert client.get("/drift", params={"top": 0}).status_code == 422


def test_a_published_model_starts_a_fresh_monitor(
    trained: Trained, make_client: MakeClient
) -> None:
    client = make_client(drift_sample_every=1)
    rt = client.app.rt  # type: ignore[attr-defined]
    _served(client, trained.x_val[:4])
    old = rt.model.drift
    assert client.get("/drift").json()["examples"] == 4
    reload.publish(rt, rt.model.predictor)  # what a hot reload does with the new predictor
    assert rt.model.drift is not None
    assert rt.model.drift is not old
    assert client.get("/drift").json()["examples"] == 0
    assert "bnserve_drift_examples 0.0" in client.get("/metrics").text
