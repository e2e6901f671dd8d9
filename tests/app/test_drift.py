"""app/drift.py against a direct, example-by-example numpy computation of the same EWMA."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from app.drift import VAR_FLOOR, DriftMonitor, DriftReport, Reference

F32 = NDArray[np.float32]
RTOL = 1e-9  # block folding vs the step-by-step recursion: rounding only, in float64


def _group(name: str, kind: str, tensor: str, mean: list[float], std: list[float],
           names: list[str] | None = None) -> dict[str, Any]:
    return {"name": name, "kind": kind, "tensor": tensor, "channel_names": names,
            "mean": mean, "std": std}


def _reference(*groups: dict[str, Any]) -> str:
    return json.dumps({"format": "bnserve-drift/1", "groups": list(groups)})


IN_MEAN, IN_STD = [10.0, -3.0, 500.0], [2.0, 0.5, 100.0]
BN_MEAN, BN_STD = [0.1, -0.2], [1.5, 0.3]
IMG_MEAN, IMG_STD = [0.0, 4.0, -1.0], [1.0, 2.0, 0.5]
MLP = _reference(_group("input", "input", "features", IN_MEAN, IN_STD, ["a", "b", "c"]),
                 _group("bn0", "batchnorm", "drift.bn0", BN_MEAN, BN_STD))
IMAGE = _reference(_group("bn0", "batchnorm", "drift.bn0", IMG_MEAN, IMG_STD))


def _direct(batches: list[dict[str, F32]], ref: Reference, tau: float) -> dict[str, Any]:
    """The lecture's recursion, one example at a time, in raw units, bias-corrected."""
    alpha = 1.0 / tau
    out: dict[str, Any] = {}
    for g in ref.groups:
        m = np.zeros(g.channels)
        s = np.zeros(g.channels)
        w = 0.0
        for batch in batches:
            for x in batch[g.tensor].astype(np.float64):
                flat = x.reshape(g.channels, -1)
                m = (1 - alpha) * m + alpha * flat.mean(axis=1)
                s = (1 - alpha) * s + alpha * (flat**2).mean(axis=1)
                w = (1 - alpha) * w + alpha
        mean, var = m / w, np.maximum(s / w - (m / w) ** 2, 0.0)
        out[g.name] = {"mean": mean, "var": var,
                       "mean_shift": np.abs(mean - g.mean) / g.std,
                       # the documented floor: a constant stream scores log(VAR_FLOOR), not -inf
                       "log_var_ratio": np.log(np.maximum(var / g.std**2, VAR_FLOOR))}
    return out


def _mlp_batch(rng: np.random.Generator, n: int, scale: float = 1.0) -> dict[str, F32]:
    x = rng.normal(IN_MEAN, IN_STD, size=(n, 3)).astype(np.float32)
    x[:, 2] *= scale
    z = rng.normal(BN_MEAN, BN_STD, size=(n, 2)).astype(np.float32)
    return {"features": x, "drift.bn0": z}


def _image_batch(rng: np.random.Generator, n: int) -> dict[str, F32]:
    mean = np.asarray(IMG_MEAN).reshape(1, 3, 1, 1)
    std = np.asarray(IMG_STD).reshape(1, 3, 1, 1)
    return {"drift.bn0": (mean + std * rng.normal(size=(n, 3, 4, 5))).astype(np.float32)}


def _assert_matches(report: DriftReport, direct: dict[str, Any]) -> None:
    for name, want in direct.items():
        got = report.group(name)
        ref = got.ref
        for key in ("mean", "mean_shift", "log_var_ratio"):
            np.testing.assert_allclose(getattr(got, key), want[key], rtol=RTOL, atol=1e-12,
                                       err_msg=f"{name}.{key}")
        # E[x^2] - E[x]^2 in raw units cancels down to rounding of E[x^2]: atol on that scale
        np.testing.assert_allclose(got.std**2, want["var"], rtol=RTOL,
                                   atol=1e-12 * float(np.max(ref.mean**2 + ref.std**2)),
                                   err_msg=f"{name}.var")


@pytest.mark.parametrize("block", [1, 7, 256])
@pytest.mark.parametrize("tau", [1.0, 20.0, 1000.0])
def test_monitor_equals_example_by_example_ewma(block: int, tau: float) -> None:
    ref = Reference.parse(MLP)
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(ref, time_constant=tau, block=block)
    seen: list[dict[str, F32]] = []
    for n in (1, 3, 50, 1, 300, 9, 1, 64):
        batch = _mlp_batch(rng, n)
        monitor.observe(batch)
        seen.append(batch)
        report = monitor.report()
        assert report.examples == sum(len(b["features"]) for b in seen)
        _assert_matches(report, _direct(seen, ref, tau))


def test_image_tensors_pool_channels_over_examples_and_positions() -> None:
    ref = Reference.parse(IMAGE)
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(ref, time_constant=100.0, block=32)
    seen = [_image_batch(rng, n) for n in (1, 5, 40, 2, 70)]
    for b in seen:
        monitor.observe(b)
    report = monitor.report()
    _assert_matches(report, _direct(seen, ref, 100.0))
    # in-distribution: pooled over 20 positions per example, the estimate sits near the reference
    g = report.group("bn0")
    assert g.worst_mean_shift < 0.1
    assert g.worst_abs_log_var_ratio < 0.1


def test_bias_correction_makes_the_first_example_its_own_estimate() -> None:
    monitor = DriftMonitor(Reference.parse(MLP), time_constant=1000.0)
    batch = _mlp_batch(np.random.default_rng(2), 1)
    monitor.observe(batch)
    got = monitor.report().group("input")
    np.testing.assert_allclose(got.mean, batch["features"][0].astype(np.float64), rtol=1e-12)
    np.testing.assert_allclose(got.std, 0.0, atol=1e-9)


def test_scaled_feature_is_the_worst_and_the_others_stay_quiet() -> None:
    monitor = DriftMonitor(Reference.parse(MLP), time_constant=500.0)
    rng = np.random.default_rng(3)
    for _ in range(20):
        monitor.observe(_mlp_batch(rng, 100))
    quiet = monitor.report()
    for _ in range(40):
        monitor.observe(_mlp_batch(rng, 100, scale=10.0))
    drifted = monitor.report()
    g = drifted.group("input")
    assert g.worst(1) == [2]
    # mean 500 -> 5000 with std 100: a shift of about 45 standard deviations, variance x100
    assert g.mean_shift[2] == pytest.approx(45.0, rel=0.05)
    assert g.log_var_ratio[2] == pytest.approx(np.log(100.0), abs=0.3)
    assert max(g.mean_shift[:2]) < 0.3
    assert quiet.group("input").worst_mean_shift < 0.3
    summary = drifted.summary()
    assert summary["worst"]["group"] == "input"
    assert summary["worst"]["name"] == "c"


def test_dead_channels_are_skipped_and_counted() -> None:
    text = _reference(_group("bn0", "batchnorm", "drift.bn0", [0.3, 0.0, 1.0], [1.0, 0.0, 1e-9]))
    monitor = DriftMonitor(Reference.parse(text), time_constant=10.0)
    rng = np.random.default_rng(4)
    monitor.observe({"drift.bn0": rng.normal(size=(20, 3)).astype(np.float32)})
    g = monitor.report().group("bn0")
    assert g.skipped == 2
    assert np.isnan(g.mean_shift[1:]).all()
    assert np.isnan(g.log_var_ratio[1:]).all()
    assert np.isfinite(g.mean_shift[0])
    assert g.worst(5) == [0]


def test_non_finite_examples_are_dropped_not_averaged() -> None:
    ref = Reference.parse(MLP)
    rng = np.random.default_rng(5)
    good = _mlp_batch(rng, 30)
    bad = _mlp_batch(rng, 4)
    bad["drift.bn0"][1, 0] = np.inf
    bad["features"][3, 2] = np.nan
    monitor = DriftMonitor(ref, time_constant=50.0, block=8)
    monitor.observe(good)
    monitor.observe(bad)
    report = monitor.report()
    assert (report.examples, report.dropped) == (32, 2)
    kept = {k: v[[0, 2]] for k, v in bad.items()}
    _assert_matches(report, _direct([good, kept], ref, 50.0))


def test_report_before_any_example_is_empty_and_json_clean() -> None:
    monitor = DriftMonitor(Reference.parse(MLP))
    report = monitor.report()
    assert report.examples == 0
    d = report.as_dict()
    json.dumps(d, allow_nan=False)
    assert d["summary"]["worst"] is None
    assert all(g["worst_mean_shift"] is None and g["worst"] == [] for g in d["groups"])


def test_as_dict_lists_the_worst_channels_first() -> None:
    monitor = DriftMonitor(Reference.parse(MLP), time_constant=100.0)
    rng = np.random.default_rng(6)
    monitor.observe(_mlp_batch(rng, 200, scale=3.0))
    d = monitor.report().as_dict(top=2)
    json.dumps(d, allow_nan=False)
    group = d["groups"][0]
    assert group["name"] == "input"
    assert len(group["worst"]) == 2
    assert group["worst"][0]["name"] == "c"
    scores = [max(c["mean_shift"], abs(c["log_var_ratio"])) for c in group["worst"]]
    assert scores == sorted(scores, reverse=True)
    assert d["examples"] == 200


def test_concurrent_observers_count_every_example() -> None:
    monitor = DriftMonitor(Reference.parse(MLP), time_constant=100.0, block=16)
    batch = _mlp_batch(np.random.default_rng(7), 3)

    def feed() -> None:
        for _ in range(200):
            monitor.observe(batch)

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert monitor.report().examples == 4 * 200 * 3


@pytest.mark.parametrize(("tensors", "message"), [
    ({"features": np.zeros((2, 3), np.float32)}, "'drift.bn0' (group 'bn0') is missing"),
    ({"features": np.zeros((2, 4), np.float32), "drift.bn0": np.zeros((2, 2), np.float32)},
     "'features' has shape [2, 4]"),
    ({"features": np.zeros((2, 3), np.float32), "drift.bn0": np.zeros((3, 2), np.float32)},
     "same N"),
    ({"features": np.zeros(3, np.float32), "drift.bn0": np.zeros((3, 2), np.float32)},
     "expected [N, 3, ...]"),
])
def test_observe_refuses_tensors_that_do_not_match(tensors: dict[str, F32], message: str) -> None:
    monitor = DriftMonitor(Reference.parse(MLP))
    with pytest.raises(ValueError, match="observe") as e:
        monitor.observe(tensors)
    assert message in str(e.value)
    assert monitor.examples == 0


@pytest.mark.parametrize("tau", [0.5, 0.0, -1.0, float("nan"), float("inf")])
def test_time_constant_must_be_at_least_one_example(tau: float) -> None:
    with pytest.raises(ValueError, match="time_constant"):
        DriftMonitor(Reference.parse(MLP), time_constant=tau)


def _with(**change: Any) -> str:
    g = _group("bn0", "batchnorm", "drift.bn0", [0.0, 1.0], [1.0, 2.0])
    g.update(change)
    return _reference(g)


@pytest.mark.parametrize(("text", "message"), [
    ("not json", "not valid JSON"),
    ("[]", "must be a JSON object"),
    (json.dumps({"format": "other/1", "groups": []}), "'format' must be"),
    (json.dumps({"format": "bnserve-drift/1", "groups": []}), "non-empty list"),
    (json.dumps({"format": "bnserve-drift/1", "groups": [3]}), "groups[0]: must be an object"),
    (_with(name=""), "non-empty string 'name'"),
    (_with(kind="layernorm"), "'kind' must be one of"),
    (_with(tensor="bn0"), "a batchnorm group watches a drift.* output"),
    (_with(kind="input", tensor="drift.x"), "an input group a graph input"),
    (_with(mean=[]), "'mean': must be a non-empty list"),
    (_with(mean=[0.0, "1"]), "'mean': must be a non-empty list of numbers"),
    (_with(std=[1.0]), "has 1 values, the group has 2 channels"),
    (_with(std=[1.0, -1.0]), "'std' must be >= 0"),
    (_with(mean=[0.0, 1e400]), "must be finite"),
    (_with(channel_names=["a"]), "1 channel_names for 2 channels"),
    (_with(channel_names="ab"), "'channel_names' must be null or a list"),
    (_reference(_group("a", "batchnorm", "drift.a", [0.0], [1.0]),
                _group("a", "batchnorm", "drift.b", [0.0], [1.0])), "share the name 'a'"),
    (_reference(_group("a", "batchnorm", "drift.a", [0.0], [1.0]),
                _group("b", "batchnorm", "drift.a", [0.0], [1.0])), "share the tensor"),
])
def test_malformed_reference_is_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="drift_reference") as e:
        Reference.parse(text)
    assert message in str(e.value)


def test_reference_lists_its_monitoring_outputs() -> None:
    ref = Reference.parse(MLP)
    assert ref.tensors == ("drift.bn0",)
    assert ref.watched == ("features", "drift.bn0")
    assert ref.groups[0].channel_names == ("a", "b", "c")


def test_observe_watched_gives_the_same_estimate_as_observe() -> None:
    ref = Reference.parse(MLP)
    rng = np.random.default_rng(8)
    batches = [_mlp_batch(rng, n) for n in (1, 2, 300, 5)]
    by_name, in_order = DriftMonitor(ref, 30.0, block=64), DriftMonitor(ref, 30.0, block=64)
    for batch in batches:
        by_name.observe(batch)
        in_order.observe_watched([batch[t] for t in ref.watched])
    one, other = by_name.report(), in_order.report()
    assert one.examples == other.examples == 308
    for ga, gb in zip(one.groups, other.groups, strict=True):
        np.testing.assert_array_equal(ga.mean_shift, gb.mean_shift)
        np.testing.assert_array_equal(ga.log_var_ratio, gb.log_var_ratio)
    with pytest.raises(ValueError, match="2 tensors, expected 1"):
        DriftMonitor(Reference.parse(IMAGE)).observe_watched([np.zeros((1, 3), np.float32)] * 2)


def test_tensors_keep_their_rank() -> None:
    monitor = DriftMonitor(Reference.parse(IMAGE))
    monitor.observe({"drift.bn0": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match="the same rank as before"):
        monitor.observe({"drift.bn0": np.zeros((2, 3, 4, 4), np.float32)})
