"""Middleware a user wraps around the app (here Starlette's CORS) sees every route, the fast
ones included; middleware added to the inner FastAPI app sees only the routes FastAPI answers
(app/service.py says so, and the README)."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from starlette.middleware.cors import CORSMiddleware

from app.main import create_app
from app.settings import Settings
from tests.app.conftest import Trained

ORIGIN = "https://dashboard.example"
ROW = [1.0] * 30


def test_cors_around_the_app_covers_predict_and_v2(trained: Trained) -> None:
    app = CORSMiddleware(create_app(Settings(model_path=trained.path)), allow_origins=[ORIGIN],
                         allow_methods=["GET", "POST"], allow_headers=["content-type"])
    with TestClient(app) as c:
        while c.get("/readyz").status_code != 200:
            time.sleep(0.01)
        for path, body in (("/predict", {"features": ROW}),
                           ("/v2/models/default/infer",
                            {"inputs": [{"name": "features", "shape": [1, 30],
                                         "datatype": "FP32", "data": ROW}]})):
            pre = c.options(path, headers={"origin": ORIGIN,
                                           "access-control-request-method": "POST",
                                           "access-control-request-headers": "content-type"})
            assert pre.status_code == 200, path
            assert pre.headers["access-control-allow-origin"] == ORIGIN
            r = c.post(path, json=body, headers={"origin": ORIGIN})
            assert r.status_code == 200, r.text
            assert r.headers["access-control-allow-origin"] == ORIGIN
            other = c.post(path, json=body, headers={"origin": "https://evil.example"})
            assert "access-control-allow-origin" not in other.headers


def test_middleware_on_the_inner_fastapi_app_misses_the_fast_routes(trained: Trained) -> None:
    """What the README warns about, pinned so the warning stays true."""
    service = create_app(Settings(model_path=trained.path))
    service.api.add_middleware(CORSMiddleware, allow_origins=[ORIGIN])  # type: ignore[attr-defined]
    with TestClient(service) as c:
        while c.get("/readyz").status_code != 200:
            time.sleep(0.01)
        assert c.get("/model", headers={"origin": ORIGIN}).headers[
            "access-control-allow-origin"] == ORIGIN
        r = c.post("/predict", json={"features": ROW}, headers={"origin": ORIGIN})
        assert r.status_code == 200
        assert "access-control-allow-origin" not in r.headers
