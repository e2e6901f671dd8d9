"""A trailing slash is another path: every route answers it with the same 404 listing the routes
(no 307 redirect for some and 404 for others). The default body limit takes a full batch of
instances by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from tests.app.conftest import Trained


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/model/"), ("GET", "/readyz/"), ("GET", "/livez/"), ("GET", "/metrics/"),
     ("GET", "/docs/"), ("GET", "/openapi.json/"), ("POST", "/predict/"),
     ("POST", "/predict/batch/")],
)
def test_a_trailing_slash_is_a_404_listing_the_routes(
    client: TestClient, method: str, path: str
) -> None:
    r = client.request(method, path, json={"features": [0.0] * 30},
                       follow_redirects=False)
    assert r.status_code == 404, (r.status_code, r.headers, r.text)
    assert "location" not in r.headers
    error = r.json()["error"]
    assert error["message"] == f"no route {path}"
    assert "POST /predict, POST /predict/batch, GET /model" in error["expected"]


def test_the_default_body_limit_takes_max_batch_instances_by_name_at_full_precision(
    client: TestClient, trained: Trained
) -> None:
    """256 by name with float32 values written in full (0.09778999835252762) are ~290 KB; the
    same by position ~150 KB, and with the data's own digits ~200 KB and ~60 KB."""
    settings = Settings()
    rows = np.resize(trained.x_val, (settings.max_batch, trained.x_val.shape[1]))
    rows32 = rows.astype(np.float32).tolist()
    by_name = {"instances": [dict(zip(trained.feature_names, r, strict=True)) for r in rows32]}
    body = json.dumps(by_name).encode()
    assert 250_000 < len(body) < settings.max_body_bytes / 3  # with room for wider models
    r = client.post("/predict/batch", content=body,
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    named = r.json()["predictions"]
    r = client.post("/predict/batch", json={"instances": rows32})
    assert r.status_code == 200
    assert named == r.json()["predictions"]
    assert len(named) == settings.max_batch
