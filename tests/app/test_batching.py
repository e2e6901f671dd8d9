"""Adaptive batching (BNSERVE_BATCHING): concurrent POST /predict requests share ONNX Runtime runs,
and every caller still gets exactly the answer it would get alone.

Concurrency here is real: many requests driven through the ASGI app at once with asyncio (all
their tasks ready in the same event-loop iteration, as when a server reads many sockets at once),
and a real ``bnserve-serve`` process fed by many raw sockets. Nothing here measures time; the
benchmark (benchmarks/run.py) does.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.lifecycle import load_model
from app.main import create_app
from app.service import Service
from app.settings import Settings
from tests.app.wire import Response, post

Trained = Any  # conftest.Trained
OVERFLOW = -3.0e38  # every feature at this value overflows inside the network (NaN output)


async def started(trained: Trained, **settings: Any) -> Service:
    app = create_app(Settings(model_path=trained.path, log_level="warning", **settings))
    await load_model(app.rt)
    return app


def body(row: Any) -> bytes:
    return orjson.dumps({"features": [float(v) for v in row]})


def batch_sizes(app: Service) -> dict[str, float]:
    """bnserve_batch_size as {"count", "sum", "le=1", "le=4", ...} from /metrics' text."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(app.metrics.render().decode()):
        if family.name == "bnserve_batch_size":
            for s in family.samples:
                key = s.name.removeprefix("bnserve_batch_size_")
                out[f"le={float(s.labels['le']):g}" if key == "bucket" else key] = s.value
    return out


async def unbatched(trained: Trained, bodies: list[bytes]) -> list[Response]:
    app = await started(trained)
    return [await post(app, "/predict", b) for b in bodies]


def test_concurrent_answers_are_bit_identical_to_unbatched_ones(trained: Trained) -> None:
    names = trained.feature_names
    bodies = [body(row) for row in trained.x_val]
    bodies += [orjson.dumps({"features": dict(zip(names, map(float, row), strict=True))})
               for row in trained.x_val[:20]]  # by name too

    async def run() -> tuple[list[Response], list[Response], dict[str, float]]:
        app = await started(trained, batching=True)
        together = await asyncio.gather(*(post(app, "/predict", b) for b in bodies))
        return list(together), await unbatched(trained, bodies), batch_sizes(app)

    together, alone, sizes = asyncio.run(run())
    assert [s for s, _ in together] == [200] * len(bodies)
    assert together == alone  # byte for byte
    assert sizes["sum"] == len(bodies)  # every example went through the batcher once
    assert sizes["count"] < len(bodies) / 10  # ... in a few runs: batches really formed
    assert sizes["le=64"] == sizes["count"]  # BNSERVE_BATCH_MAX_SIZE's default caps them


def test_batch_max_size_caps_every_run(trained: Trained) -> None:
    async def run() -> tuple[list[Response], dict[str, float]]:
        app = await started(trained, batching=True, batch_max_size=4)
        out = await asyncio.gather(*(post(app, "/predict", body(r)) for r in trained.x_val[:30]))
        return list(out), batch_sizes(app)

    out, sizes = asyncio.run(run())
    assert all(status == 200 for status, _ in out)
    assert sizes["sum"] == 30
    assert sizes["le=4"] == sizes["count"]
    assert sizes["count"] - sizes["le=2"] > 0  # runs of 3 or 4 happened


def test_runs_never_exceed_max_batch_the_largest_size_warm_up_checks(trained: Trained) -> None:
    async def run() -> dict[str, float]:
        app = await started(trained, batching=True, batch_max_size=64, max_batch=4)
        out = await asyncio.gather(*(post(app, "/predict", body(r)) for r in trained.x_val[:20]))
        assert all(status == 200 for status, _ in out)
        return batch_sizes(app)

    sizes = asyncio.run(run())
    assert sizes["sum"] == 20
    assert sizes["le=4"] == sizes["count"]


def test_one_rows_failure_reaches_only_its_own_caller(trained: Trained) -> None:
    rows = [body(row) for row in trained.x_val[:30]]
    bodies = [*rows[:15], body([OVERFLOW] * len(trained.feature_names)), *rows[15:]]

    async def run() -> tuple[list[Response], list[Response], dict[str, float]]:
        app = await started(trained, batching=True)
        together = await asyncio.gather(*(post(app, "/predict", b) for b in bodies))
        return list(together), await unbatched(trained, rows), batch_sizes(app)

    together, alone, sizes = asyncio.run(run())
    status, text = together.pop(15)
    assert status == 422
    assert b"overflow" in text
    assert together == alone
    assert sizes["sum"] == len(bodies)  # the overflowing row was inside a batch
    assert sizes["count"] < 5


def test_a_failing_run_is_retried_row_by_row_so_only_the_culprit_fails(
    trained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison = 12345.0  # a row starting with this makes the (patched) runtime raise

    async def run() -> tuple[list[Response], list[Response]]:
        app = await started(trained, batching=True)
        assert app.rt.model is not None
        predictor = app.rt.model.predictor
        real, real_watched = predictor.predict, predictor.run_watched

        def predict(x: Any) -> Any:
            if (x[:, 0] == poison).any():
                raise RuntimeError("the runtime failed")
            return real(x)

        def run_watched(x: Any) -> Any:  # the run drift monitoring takes (on by default)
            if (x[:, 0] == poison).any():
                raise RuntimeError("the runtime failed")
            return real_watched(x)

        monkeypatch.setattr(predictor, "predict", predict)
        monkeypatch.setattr(predictor, "run_watched", run_watched)
        bad = trained.x_val[0].copy()
        bad[0] = poison
        bodies = [body(r) for r in trained.x_val[:10]] + [body(bad)]
        bodies += [body(r) for r in trained.x_val[10:20]]
        together = await asyncio.gather(*(post(app, "/predict", b) for b in bodies))
        rows = [body(r) for r in trained.x_val[:20]]
        return list(together), await unbatched(trained, rows)

    together, alone = asyncio.run(run())
    status, text = together.pop(10)
    assert status == 500
    assert b"internal server error" in text
    assert together == alone


def test_malformed_requests_never_enter_a_batch(trained: Trained) -> None:
    good = [body(row) for row in trained.x_val[:20]]
    n = len(trained.feature_names)
    malformed = [b"", b"{not json", orjson.dumps({"features": [1.0] * (n - 1)}),
                 b'{"features": [' + b", ".join([b"NaN"] * n) + b"]}",
                 orjson.dumps({"features": ["1"] * n}), orjson.dumps({"feature": [1.0] * n})]
    bodies = [b for pair in zip(good, malformed + [None] * len(good), strict=False)
              for b in pair if b is not None]

    async def run() -> tuple[list[Response], dict[str, float]]:
        app = await started(trained, batching=True)
        out = await asyncio.gather(*(post(app, "/predict", b) for b in bodies))
        return list(out), batch_sizes(app)

    out, sizes = asyncio.run(run())
    statuses = {b: s for b, (s, _) in zip(bodies, out, strict=True)}
    assert all(statuses[b] == 200 for b in good)
    assert all(statuses[b] in (400, 422) for b in malformed)
    assert sizes["sum"] == len(good)  # only the valid examples reached the runtime
    assert sizes["count"] < len(good)


def test_a_lone_request_runs_at_once_whatever_max_wait_says(trained: Trained) -> None:
    async def run() -> tuple[list[Response], list[Response], Service]:
        app = await started(trained, batching=True, batch_max_wait_ms=1000)
        lone = []
        for r in trained.x_val[:3]:
            lone.append(await post(app, "/predict", body(r)))
            await asyncio.sleep(0)  # the next request comes in a later loop iteration, as at c=1
        return lone, await unbatched(trained, [body(r) for r in trained.x_val[:3]]), app

    lone, alone, app = asyncio.run(run())
    assert lone == alone
    assert app.plane.batcher is not None
    assert app.plane.batcher.timers_armed == 0  # never held for max_wait
    sizes = batch_sizes(app)
    assert (sizes["count"], sizes["le=1"]) == (3, 3)  # each ran alone, at once


def test_max_wait_holds_a_queue_that_has_company_and_answers_stay_exact(
    trained: Trained,
) -> None:
    async def run() -> tuple[list[Response], list[Response], Service]:
        app = await started(trained, batching=True, batch_max_wait_ms=20)
        bodies = [body(r) for r in trained.x_val[:12]]
        first = asyncio.gather(*(post(app, "/predict", b) for b in bodies[:6]))
        await asyncio.sleep(0)  # a later loop iteration joins the held queue
        second = asyncio.gather(*(post(app, "/predict", b) for b in bodies[6:]))
        out = [*await first, *await second]
        return out, await unbatched(trained, bodies), app

    out, alone, app = asyncio.run(run())
    assert out == alone
    assert app.plane.batcher is not None
    assert app.plane.batcher.timers_armed >= 1
    sizes = batch_sizes(app)
    assert sizes["sum"] == 12
    assert sizes["count"] < 6


def test_batching_is_off_by_default_and_set_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = Settings()
    assert (s.batching, s.batch_max_size, s.batch_max_wait_ms) == (False, 64, 0.0)
    monkeypatch.setenv("BNSERVE_BATCHING", "true")
    monkeypatch.setenv("BNSERVE_BATCH_MAX_SIZE", "16")
    monkeypatch.setenv("BNSERVE_BATCH_MAX_WAIT_MS", "2.5")
    s = Settings()
    assert (s.batching, s.batch_max_size, s.batch_max_wait_ms) == (True, 16, 2.5)


def raw_post(sock: socket.socket, payload: bytes) -> None:
    """One POST /predict written to an open connection; its answer is read later."""
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))


def read_answer(sock: socket.socket) -> Response:
    """The response to one request; the server closes the connection only when told to, so the
    body is read by its Content-Length."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {buf!r}"
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        rest += chunk
    return int(head.split(b" ", 2)[1]), rest[:length]


def server_batch_sizes(url: str) -> tuple[float, float]:
    """(runs, runs of one example) from a real server's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    runs = alone = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "bnserve_batch_size_count":
                runs += s.value
            elif s.name == "bnserve_batch_size_bucket" and s.labels["le"] == "1.0":
                alone += s.value
    return runs, alone


@pytest.mark.slow
def test_a_real_server_coalesces_requests_from_many_connections(
    start_server: Any, trained: Trained
) -> None:
    server = start_server(batching="true")
    server.wait_ready()
    rows = [body(r) for r in trained.x_val[:32]]
    expected = [reference_answer(server.url, r) for r in rows]
    batched = 0.0
    for _ in range(50):  # rounds of 32 requests written at once, until some run held several
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in rows]
        try:
            for sock, b in zip(socks, rows, strict=True):  # connected first, then written at once
                raw_post(sock, b)
            answers = [read_answer(sock) for sock in socks]
        finally:
            for sock in socks:
                sock.close()
        assert answers == [(200, e) for e in expected]
        runs, alone = server_batch_sizes(server.url)
        batched = runs - alone
        if batched:
            break
    assert batched > 0, "no run ever held more than one example"


def reference_answer(url: str, row_body: bytes) -> bytes:
    """The answer for one row from /predict/batch, which never goes through the batcher."""
    doc = orjson.loads(row_body)
    r = httpx.post(url + "/predict/batch", json={"instances": [doc["features"]]}, timeout=10)
    assert r.status_code == 200
    return orjson.dumps(r.json()["predictions"][0])


def test_rows_of_different_batches_give_the_same_bits(trained: Trained) -> None:
    """The property batching relies on, checked directly: a row's output does not depend on
    the batch it runs in (sizes 1 to 64)."""

    async def run() -> Service:
        return await started(trained)

    app = asyncio.run(run())
    assert app.rt.model is not None
    predict = app.rt.model.predictor.predict
    x = trained.x_val.astype(np.float32)
    alone = np.vstack([predict(x[i : i + 1])[0] for i in range(64)])
    for n in (2, 3, 7, 16, 33, 64):
        assert np.array_equal(predict(x[:n])[0], alone[:n])
