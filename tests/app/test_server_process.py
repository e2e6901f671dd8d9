"""End to end: the real ``bnserve-serve`` command (uvicorn, uvloop, httptools) on 127.0.0.1 and a
free port, talked to over HTTP; stopped with SIGTERM, as Kubernetes does."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

TOL = 1e-6


def http_head(method: str, path: str, length: int, request_id: str = "", extra: str = "") -> bytes:
    """The head of a raw HTTP/1.1 request with a JSON body of ``length`` bytes."""
    rid = f"X-Request-ID: {request_id}\r\n" if request_id else ""
    return (f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{rid}{extra}\r\n").encode()


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length, read from a raw socket."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed mid-response: {buf!r}")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    n = int(headers["content-length"])
    while len(body) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed mid-body")
        body += chunk
    return int(status_line.split()[1]), headers, body[:n]


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def wait_until(predicate: Any, timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic()


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def rows_of(trained: Any, n: int) -> list[list[float]]:
    return [[float(v) for v in row] for row in trained.x_val[:n]]


def test_real_server_predicts_rejects_bad_input_and_logs_json(
    start_server: Any, trained: Any
) -> None:
    server = start_server(max_body_bytes=4096)
    server.wait_ready()
    rows = rows_of(trained, len(trained.x_val))
    ref = trained.reference(trained.x_val)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        singles = []
        for i, row in enumerate(rows):
            r = http.post("/predict", json={"features": row}, headers={"x-request-id": f"e2e-{i}"})
            assert r.status_code == 200
            assert r.headers["x-request-id"] == f"e2e-{i}"
            body = r.json()
            probs = [body["probabilities"][c] for c in trained.class_names]
            np.testing.assert_allclose(probs, ref[i], rtol=0, atol=TOL)
            assert body["class_index"] == int(ref[i].argmax())
            singles.append(body)
        r = http.post("/predict/batch", json={"instances": rows[:5]})  # within the 4 KiB limit
        assert r.json()["predictions"] == singles[:5]

        for content, ctype, status in [
            (b'{"features": [NaN]}', "application/json", 422),
            (json.dumps({"features": rows[0][:-1]}).encode(), "application/json", 422),
            (b"nope", "application/json", 400),
            (json.dumps({"features": rows[0]}).encode(), "text/plain", 415),
        ]:
            r = http.post("/predict", content=content, headers={"content-type": ctype})
            assert r.status_code == status
            assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
        assert http.get("/nope").status_code == 404
        assert http.get("/predict").status_code == 405
        assert http.get("/model").json()["model_version"] == trained.model_version

    # body limit over a real socket: by Content-Length, then chunked. A refused body closes the
    # connection (issue 10: what follows must not be read as the rest of that body); the
    # server keeps serving on new ones.
    ok = json.dumps({"features": rows[0]}).encode()
    big = b'{"features": [' + b"1.0, " * 2000 + b"1.0]}"
    chunked = b"".join(b"%x\r\n%s\r\n" % (500, b" " * 500) for _ in range(20)) + b"0\r\n\r\n"
    for refused in (http_head("POST", "/predict", len(big)) + big,
                    b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + chunked):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(refused)
            status, headers, body = read_response(s)
            assert status == 413
            assert b"larger than the limit of 4096 bytes" in body
            assert headers["connection"] == "close"
            assert s.recv(1) == b""  # the end of the stream, not a reset
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(http_head("POST", "/predict", len(ok)) + ok)
            assert read_response(s)[0] == 200

    assert server.terminate() == 0
    logs = server.json_logs()  # every line parses as JSON
    start = next(x for x in logs if x["logger"] == "bnserve.cli")
    assert start["intra_op_threads"] >= 1
    assert "CPU budget" in start["msg"]
    access = {x["request_id"]: x for x in logs if x["logger"] == "bnserve.access"}
    for i in range(len(rows)):
        line = access[f"e2e-{i}"]
        assert (line["method"], line["path"], line["status"]) == ("POST", "/predict", 200)
        assert line["latency_ms"] > 0
    assert not any(x["logger"] == "uvicorn.access" for x in logs)
    assert any(x["msg"] == "model ready" for x in logs)


def test_sigterm_turns_readiness_503_at_once_and_in_flight_requests_all_succeed(
    start_server: Any, trained: Any
) -> None:
    delay, grace = 1.5, 10
    server = start_server(shutdown_delay_seconds=delay, shutdown_grace_seconds=grace)
    server.wait_ready()
    rows = rows_of(trained, 6)
    bodies = [json.dumps({"features": row}).encode() for row in rows]
    expected = [httpx.post(server.url + "/predict", content=b, timeout=10,
                           headers={"content-type": "application/json"}).json() for b in bodies]

    # Six requests in flight: headers and half of each body sent, the rest held back.
    held = []
    for i, body in enumerate(bodies):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(http_head("POST", "/predict", len(body), f"held-{i}") + body[: len(body) // 2])
        held.append(s)
    wait_until(lambda: metric(server.url, "bnserve_requests_in_flight") == len(held), 10,
               "the held requests to be in flight")

    # Traffic like a load balancer's: it keeps sending until it sees readiness drop.
    stop = threading.Event()
    results: list[tuple[float, int | str]] = []

    def traffic(k: int) -> None:
        while not stop.is_set():
            t = time.monotonic()
            try:
                r = httpx.post(server.url + "/predict", content=bodies[k], timeout=10,
                               headers={"content-type": "application/json"})
                results.append((t, r.status_code))
            except httpx.HTTPError as e:
                results.append((t, repr(e)))

    threads = [threading.Thread(target=traffic, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)

    t_sig = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    t_503 = wait_until(lambda: httpx.get(server.url + "/readyz", timeout=5).status_code == 503,
                       delay, "readiness to turn 503")
    assert t_503 - t_sig < delay  # at once, while the listener is still open
    assert httpx.get(server.url + "/readyz").json()["reason"] == "shutting down"
    stop.set()
    for t in threads:
        t.join(15)
    assert results
    assert all(status == 200 for _, status in results), [r for r in results if r[1] != 200]
    assert any(t > t_sig for t, _ in results)  # served after SIGTERM, during the delay

    # After the delay the listener closes; the held requests are still in flight.
    t_closed = wait_until(lambda: refuses_connections(server.port), delay + 5, "listener close")
    assert t_closed - t_sig >= delay - 0.1
    assert server.proc.poll() is None  # waiting for the in-flight requests
    for i, (s, body) in enumerate(zip(held, bodies, strict=True)):
        s.sendall(body[len(body) // 2 :])
        status, headers, payload = read_response(s)
        assert status == 200
        assert headers["x-request-id"] == f"held-{i}"
        assert json.loads(payload) == expected[i]
        s.close()

    assert server.proc.wait(grace) == 0
    assert time.monotonic() - t_sig < delay + grace
    msgs = [x["msg"] for x in server.json_logs()]
    assert any(m.startswith("SIGTERM received: readiness is now 503") for m in msgs)


def test_two_workers_serve_one_port_aggregate_metrics_and_drain_on_sigterm(
    start_server: Any, trained: Any, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "prom"
    server = start_server(workers=2, metrics_dir=metrics_dir, shutdown_delay_seconds=2.0)

    def ready_pids() -> set[int]:
        return {x["pid"] for x in server.json_logs() if x["msg"] == "model ready"}

    wait_until(lambda: len(ready_pids()) == 2, 60, "both workers to load the model")
    server.wait_ready()
    body = json.dumps({"features": rows_of(trained, 1)[0]}).encode()

    def send(n: int) -> int:  # a new connection per request, so either worker may take it
        r = httpx.post(server.url + "/predict", content=body, timeout=10,
                       headers={"content-type": "application/json", "x-request-id": f"w-{n}"})
        return r.status_code

    def pids_that_served() -> set[int]:
        return {x["pid"] for x in server.json_logs()
                if x.get("request_id", "").startswith("w-")}

    sent = 0
    with ThreadPoolExecutor(8) as pool:
        for _ in range(20):  # rounds of 25 concurrent requests until both workers have served
            assert set(pool.map(send, range(sent, sent + 25))) == {200}
            sent += 25
            time.sleep(0.05)  # access lines are written right after each event-loop iteration
            if len(pids_that_served()) == 2:
                break
    assert pids_that_served() == ready_pids()
    assert metric(server.url, "bnserve_requests_total", route="/predict", status="200") == sent
    assert metric(server.url, "bnserve_predictions_total") == sent
    assert metric(server.url, "bnserve_requests_in_flight") == 0
    files = {m.group(1) for f in metrics_dir.iterdir()
             if (m := re.fullmatch(r"counter_(\d+)\.db", f.name))}
    assert {int(p) for p in files} == ready_pids()  # one file per worker, summed by /metrics

    t_sig = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)  # to the supervisor, which passes it to each worker

    def all_unready() -> bool:
        return all(httpx.get(server.url + "/readyz", timeout=5).status_code == 503
                   for _ in range(6))

    wait_until(all_unready, 2.0, "both workers to report 503")
    assert server.proc.wait(30) == 0
    assert time.monotonic() - t_sig < 15
    drained = {x["pid"] for x in server.json_logs() if x["msg"].startswith("SIGTERM received")}
    assert drained == ready_pids()


@pytest.mark.parametrize("workers", [1, 2])
def test_fail_fast_exits_non_zero_with_a_clear_message(
    start_server: Any, tmp_path: Path, workers: int
) -> None:
    server = start_server(model_path=tmp_path / "missing.onnx", fail_fast="true", workers=workers)
    assert server.proc.wait(60) == 2
    errors = [x["msg"] for x in server.json_logs() if x["level"] == "error"]
    assert len(errors) == 1
    assert "missing.onnx' does not exist" in errors[0]
    assert "exiting (fail_fast)" in errors[0]


def test_corrupt_model_without_fail_fast_runs_unready_and_says_why(
    start_server: Any, tmp_path: Path
) -> None:
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    server = start_server(model_path=bad)
    server.wait_listening()
    assert httpx.get(server.url + "/livez").status_code == 200

    def reason() -> str:
        reason: str = httpx.get(server.url + "/readyz").json()["reason"]
        return reason

    wait_until(lambda: reason().startswith("model not loaded"), 30, "the load to fail")
    assert httpx.get(server.url + "/readyz").status_code == 503
    assert "corrupt.onnx' is not a loadable ONNX model" in reason()
    r = httpx.post(server.url + "/predict", json={"features": [1.0] * 30})
    assert r.status_code == 503
    assert server.terminate() == 0
    errors = [x["msg"] for x in server.json_logs() if x["level"] == "error"]
    assert len(errors) == 1
    assert "is not a loadable ONNX model" in errors[0]


def test_invalid_settings_exit_2_and_name_the_setting(start_server: Any) -> None:
    server = start_server(workers=0)
    assert server.proc.wait(30) == 2
    text = server.log_path.read_text()
    assert "invalid settings" in text
    assert "workers" in text


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_exits_3_with_one_clear_line_before_loading_the_model(
    start_server: Any, workers: int
) -> None:
    with socket.socket() as taken:  # another process's listener on the port bnserve is given
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server(port=port, workers=workers)
        assert server.proc.wait(30) == 3
    logs = server.json_logs()
    errors = [x["msg"] for x in logs if x["level"] == "error"]
    assert f"cannot listen on 127.0.0.1:{port}" in errors[-1]
    assert "BNSERVE_PORT" in errors[-1]
    assert not any(x["msg"] == "model ready" for x in logs)  # it stopped before the load
    assert "terminate called" not in server.log_path.read_text()  # no abort from ORT threads
