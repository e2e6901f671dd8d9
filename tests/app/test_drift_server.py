"""Drift monitoring in a real bnserve-serve process: an in-distribution stream stays quiet, a
stream with one feature in other units (x10) shows up on that feature in /metrics and GET /drift,
with the number of examples the estimate rests on; refused requests never count."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.plane import PUBLISH_SECONDS
from tests.app.conftest import StartServer, Trained

pytestmark = pytest.mark.slow

THRESHOLD = 1.0  # the alert's mean-shift threshold (deploy/monitoring/bnserve-drift-rules.yml)
TAU = 200  # examples: short, so the test's streams are a few time constants long
DRIFTED = "texture_mean"


def gauges(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("bnserve_drift_")}


def send(url: str, rows: np.ndarray[Any, Any]) -> None:
    """A third one by one through /predict, the rest through /predict/batch, 40 at a time."""
    single = len(rows) // 3
    with httpx.Client(base_url=url, timeout=10) as c:
        for row in rows[:single]:
            assert c.post("/predict", json={"features": row.tolist()}).status_code == 200
        for i in range(single, len(rows), 40):
            r = c.post("/predict/batch", json={"instances": rows[i : i + 40].tolist()})
            assert r.status_code == 200


def send_bad(url: str, width: int) -> None:
    with httpx.Client(base_url=url, timeout=10) as c:
        for body, route in (({"features": [1.0] * (width - 1)}, "/predict"),
                            ({"features": [1e39] * width}, "/predict"),
                            ({"instances": [[1.0] * width, [2.0]]}, "/predict/batch"),
                            ({"features": "a"}, "/predict")):
            assert c.post(route, json=body).status_code in (400, 422)


def test_drifted_feature_shows_in_metrics_and_drift_and_in_distribution_stays_quiet(
    trained: Trained, start_server: StartServer
) -> None:
    server = start_server(drift_time_constant=TAU, drift_min_examples=100,
                          drift_sample_every=1)
    server.wait_ready()
    url = server.url
    rng = np.random.default_rng(0)
    quiet = trained.result.x_train[rng.permutation(len(trained.result.x_train))[:3 * TAU]]
    send(url, quiet)
    send_bad(url, quiet.shape[1])
    d = httpx.get(url + "/drift", timeout=10).json()
    assert (d["monitoring"], d["examples"], d["time_constant"]) == (True, len(quiet), TAU)
    assert d["summary"]["worst_mean_shift"] < THRESHOLD
    m = gauges(url)
    assert m[("bnserve_drift_examples", ())] == len(quiet)
    groups = {dict(k[1])["group"]: v for k, v in m.items() if k[0] == "bnserve_drift_mean_shift"}
    assert set(groups) == {g["name"] for g in d["groups"]}
    assert 0 < max(groups.values()) < THRESHOLD

    k = trained.feature_names.index(DRIFTED)
    drifted = np.vstack([trained.x_val, quiet])[: 3 * TAU].copy()
    drifted[:, k] *= 10
    send(url, drifted)
    send_bad(url, quiet.shape[1])
    d = httpx.get(url + "/drift", params={"top": 3}, timeout=10).json()
    assert d["examples"] == len(quiet) + len(drifted)
    assert d["summary"]["worst"]["name"] == DRIFTED
    assert d["summary"]["worst_mean_shift"] > 10 * THRESHOLD
    inputs = next(g for g in d["groups"] if g["kind"] == "input")
    assert inputs["worst"][0]["name"] == DRIFTED
    assert inputs["worst"][1]["mean_shift"] < THRESHOLD  # the other features stay quiet
    m = gauges(url)
    assert m[("bnserve_drift_examples", ())] == d["examples"]
    per_feature = {dict(k[1])["feature"]: v for k, v in m.items()
                   if k[0] == "bnserve_drift_feature_mean_shift"}
    assert set(per_feature) == set(trained.feature_names)
    assert per_feature[DRIFTED] == pytest.approx(inputs["worst"][0]["mean_shift"], rel=1e-9)
    assert max(v for f, v in per_feature.items() if f != DRIFTED) < THRESHOLD
    assert m[("bnserve_drift_mean_shift", (("group", "input"),))] > 10 * THRESHOLD
    assert m[("bnserve_drift_feature_abs_log_var_ratio", (("feature", DRIFTED),))] > np.log(10)


def test_two_workers_each_estimate_and_metrics_combine_them(
    trained: Trained, start_server: StartServer, tmp_path: Path
) -> None:
    """Each worker watches what it served: bnserve_drift_examples sums the live workers
    (livesum), the scores are the worst worker's (livemax), GET /drift is one worker's own."""
    server = start_server(workers=2, metrics_dir=tmp_path / "metrics", drift_sample_every=1,
                          drift_min_examples=1)
    server.wait_ready()
    url = server.url
    rows = trained.result.x_train[:400].copy()
    rows[:, trained.feature_names.index(DRIFTED)] *= 10
    with httpx.Client(base_url=url, timeout=10) as c:
        for row in rows:  # one connection per request: the kernel spreads them over workers
            with httpx.Client(base_url=url, timeout=10) as one:
                assert one.post("/predict", json={"features": row.tolist()}).status_code == 200
        answers = [c.get("/drift").json() for _ in range(4)]
    time.sleep(2 * PUBLISH_SECONDS)  # every worker has written its latest estimate since
    m = gauges(url)
    assert m[("bnserve_drift_examples", ())] == len(rows)
    pids = {a["worker_pid"] for a in answers}
    assert all(0 < a["examples"] <= len(rows) for a in answers)
    shifts = [a["summary"]["worst_mean_shift"] for a in answers]
    assert all(s > 10 * THRESHOLD for s in shifts)
    # the gauge is the largest worker's score; each answer is one worker's own estimate
    assert m[("bnserve_drift_mean_shift", (("group", "input"),))] >= max(shifts) - 1e-9
    assert len(pids) >= 1
