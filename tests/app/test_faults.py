"""Faults an operator meets, against real ``bnserve-serve`` processes: a worker killed outright
(no traffic for it before its model is warm; its in-flight requests leave the gauge), SIGTERM
while the model load hangs, model files that must be refused before they are read, and hot
reload under load (zero failed requests; a bad file leaves the old model serving and says why).
Also what GET /model shows by default and with BNSERVE_EXPOSE_DETAILS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from app import schemas, supervisor
from app.lifecycle import load_model
from app.main import create_app
from app.predictor import Predictor
from app.reload import publish
from app.settings import Settings
from model_export import data, export, train

IN_FLIGHT = "bnserve_requests_in_flight"
JSON = {"content-type": "application/json"}


# ---------------------------------------------------------------- helpers


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def ready_pids(server: Any) -> list[int]:
    return [x["pid"] for x in server.json_logs() if x["msg"] == "model ready"]


def gone(pid: int) -> bool:
    """Dead (a zombie not yet reaped by its parent counts: its sockets are closed)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def in_flight_by_pid(metrics_dir: Path) -> dict[int, float]:
    """Each live worker's own in-flight gauge, read from its multiprocess file."""
    out = {}
    for f in metrics_dir.glob("gauge_livesum_*.db"):
        values = MmapedDict.read_all_values_from_file(str(f))  # type: ignore[no-untyped-call]
        out[int(f.stem.rsplit("_", 1)[1])] = sum(
            value for key, value, _, _ in values if json.loads(key)[1] == IN_FLIGHT)
    return out


def hold_request(port: int, body: bytes) -> socket.socket:
    """A request in flight: its head and half of its body sent, the rest held back."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body[: len(body) // 2]))
    return s


class Traffic:
    """Threads sending POST /predict in a loop until stopped; every outcome is kept."""

    def __init__(self, url: str, body: bytes, threads: int, new_connections: bool) -> None:
        self.url, self.body, self.new_connections = url, body, new_connections
        self.results: list[tuple[float, int | str, str | None]] = []  # (t, status, version)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                headers = {**JSON, "x-request-id": f"t{i}-{n}"}
                if self.new_connections:
                    headers["connection"] = "close"  # so any worker may take the next one
                t = time.monotonic()
                try:
                    r = client.post("/predict", content=self.body, headers=headers)
                except httpx.HTTPError as e:
                    self.results.append((t, repr(e), None))
                    continue
                version = r.json().get("model_version") if r.status_code == 200 else r.text
                self.results.append((t, r.status_code, version))

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def failures(self) -> list[tuple[float, int | str, str | None]]:
        return [r for r in self.results if r[1] != 200]


@pytest.fixture
def body(trained: Any) -> bytes:
    return json.dumps({"features": [float(v) for v in trained.x_val[0]]}).encode()


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    """Another valid model of the same interface: trained briefly with another seed."""
    config = train.TrainConfig(seed=7, epochs=3)
    res = train.train(data.load_default(), config, log=lambda s: None)
    meta = {**res.meta, "hidden": list(config.hidden)}
    exp = export.export(res.net, meta, res.x_val, log=lambda s: None)
    return exp.model_bytes, export.default_version(res.net)


# Server processes started by a test using this fixture load models through these hooks (the
# interpreter imports sitecustomize at start, in the supervisor and in each worker), set by
# start_server(tests_hang_on=..., tests_load_delay=...); Settings ignores unknown BNSERVE_*.
_SITECUSTOMIZE = """
import os
hang, delay = os.environ.get("BNSERVE_TESTS_HANG_ON"), os.environ.get("BNSERVE_TESTS_LOAD_DELAY")
if hang or delay:
    import time
    from app.predictor import Predictor
    _load = Predictor.load.__func__

    def _load_with_hooks(cls, *args, **kwargs):
        if hang:  # the model sits on a filesystem that never answers: blocked in the kernel
            os.open(hang, os.O_RDONLY)  # a FIFO nobody writes to
        time.sleep(float(delay or 0))  # a model that takes this long to load
        return _load(cls, *args, **kwargs)

    Predictor.load = classmethod(_load_with_hooks)
"""


@pytest.fixture
def load_hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])]))


def replace_file(path: Path, content: bytes) -> None:
    """As an operator should: write beside it, then rename over it (atomic)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(content)
    os.replace(tmp, path)


# ---------------------------------------------------------------- a worker killed outright


@pytest.mark.slow
def test_a_restarted_worker_takes_no_request_before_its_model_is_warm(
    start_server: Any, body: bytes, tmp_path: Path, load_hooks: None
) -> None:
    # a load of 0.5 s (a larger model): long enough that traffic would find a worker loading
    server = start_server(workers=2, metrics_dir=tmp_path / "prom", tests_load_delay=0.5)
    wait_until(lambda: len(ready_pids(server)) == 2, 60, "both workers to load the model")
    victim = ready_pids(server)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: gone(victim), 5, "the killed worker to die")

    # New connections all along, so the restarted worker gets its share as soon as it accepts.
    deadline = time.monotonic() + 20
    with Traffic(server.url, body, threads=4, new_connections=True) as traffic:
        wait_until(lambda: len(ready_pids(server)) == 3, 20, "uvicorn to restart the worker",
                   interval=0.2)  # reading a growing log: not too often
        newcomer = ready_pids(server)[2]

        def newcomer_served() -> bool:
            return sum(1 for x in server.json_logs()
                       if x.get("pid") == newcomer and x.get("status") == 200) >= 20

        wait_until(lambda: newcomer_served() or time.monotonic() > deadline, 20,
                   "the restarted worker to serve", interval=0.2)
    statuses = Counter(status for _, status, _ in traffic.results)
    assert traffic.failures() == [], statuses  # not one 503 "loading model", nor a reset
    assert newcomer_served()  # traffic really reached the restarted worker


@pytest.mark.slow
def test_a_killed_workers_in_flight_requests_leave_the_gauge(
    start_server: Any, body: bytes, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "prom"
    server = start_server(workers=2, metrics_dir=metrics_dir)
    wait_until(lambda: len(ready_pids(server)) == 2, 60, "both workers to load the model")
    held: list[socket.socket] = []
    while len(held) < 64:  # until both workers have some (the kernel picks who accepts)
        held.append(hold_request(server.port, body))
        time.sleep(0.01)
        by_pid = in_flight_by_pid(metrics_dir)
        if len(held) >= 4 and sum(v > 0 for v in by_pid.values()) == 2:
            break
    wait_until(lambda: sum(in_flight_by_pid(metrics_dir).values()) == len(held), 10,
               "every held request to be in flight")
    by_pid = in_flight_by_pid(metrics_dir)
    assert metric(server.url, IN_FLIGHT) == len(held)
    victim = max(by_pid, key=lambda pid: by_pid[pid])
    assert by_pid[victim] >= 1

    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(ready_pids(server)) == 3, 20, "uvicorn to restart the worker")
    for s in held:  # the survivor's requests complete; the dead worker's connections are reset
        try:
            s.sendall(body[len(body) // 2 :])
            s.recv(65536)
        except OSError:
            pass
        s.close()
    wait_until(lambda: metric(server.url, IN_FLIGHT) == 0, 5,
               f"{IN_FLIGHT} to return to 0 (the dead worker had {by_pid[victim]:g})")
    assert not (metrics_dir / f"gauge_livesum_{victim}.db").exists()
    assert metric(server.url, "bnserve_requests_total", route="/predict", status="200") >= 1


def test_supervisor_checks_uvicorn_internals_and_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert supervisor.missing_internals() == []  # the uvicorn this is tested with

    class Changed:  # a future uvicorn that renamed what bnserve relies on
        def handle_signals(self) -> None: ...

    assert supervisor.missing_internals(Changed) == [
        "Multiprocess.keep_subprocess_alive()", "Multiprocess.handle_hup()"]
    monkeypatch.setattr(supervisor, "missing_internals", lambda: ["Multiprocess.handle_hup()"])
    made: list[Any] = []

    def stock(*a: Any, **k: Any) -> str:
        made.append(a)
        return "stock"

    monkeypatch.setattr(supervisor, "Multiprocess", stock)
    assert supervisor.make_supervisor(object(), []) == "stock"  # type: ignore[arg-type, comparison-overlap]
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert "missing: Multiprocess.handle_hup()" in record.getMessage()


# ---------------------------------------------------------------- SIGTERM while the load hangs

@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "model.fifo"
    os.mkfifo(path)
    yield path
    # wake any reader still blocked (the code before the fix leaves them hanging)
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.slow
def test_sigterm_with_a_fifo_as_model_path_exits_at_once(start_server: Any, fifo: Path) -> None:
    server = start_server(model_path=fifo, shutdown_grace_seconds=3)
    server.wait_listening()
    wait_until(lambda: "FIFO" in httpx.get(server.url + "/readyz").json()["reason"], 10,
               "the FIFO to be refused")
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(5) == 0
    assert time.monotonic() - t0 < 3


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_while_the_model_load_hangs_exits_within_the_grace_period(
    start_server: Any, fifo: Path, load_hooks: None, workers: int
) -> None:
    server = start_server(shutdown_grace_seconds=3, workers=workers, tests_hang_on=fifo)

    def started() -> int:
        return sum(x["msg"].startswith("Started server process") for x in server.json_logs())

    wait_until(lambda: started() == workers, 30, "the server processes to start", interval=0.1)
    time.sleep(0.5)  # and get stuck in the load
    assert server.proc.poll() is None
    if workers == 1:
        assert "loading model" in httpx.get(server.url + "/readyz").json()["reason"]
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        status = server.proc.wait(3 + 2)
    except Exception:
        server.proc.kill()
        raise
    assert status == 0
    assert time.monotonic() - t0 < 3 + 2


# ---------------------------------------------------------------- files refused before reading


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["oversized", "fifo"])
def test_fail_fast_refuses_a_file_it_must_not_read_with_exit_2(
    start_server: Any, fifo: Path, kind: str
) -> None:
    if kind == "oversized":  # the default model is about 8 KB
        server = start_server(fail_fast="true", max_model_bytes=1000)
        words = "bytes, over the limit of 1000 bytes (BNSERVE_MAX_MODEL_BYTES)"
    else:
        server = start_server(fail_fast="true", model_path=fifo)
        words = "is a FIFO, not a regular file"
    try:
        assert server.proc.wait(20) == 2
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    errors = [x["msg"] for x in server.json_logs() if x["level"] == "error"]
    assert len(errors) == 1, errors
    assert words in errors[0]
    assert "exiting (fail_fast)" in errors[0]
    assert "Traceback" not in server.log_path.read_text()


# ---------------------------------------------------------------- hot reload


@pytest.mark.slow
def test_reload_under_load_fails_no_request_and_a_bad_file_keeps_the_old_model(
    start_server: Any, trained: Any, second_model: tuple[bytes, str], body: bytes,
    tmp_path: Path,
) -> None:
    new_bytes, new_version = second_model
    assert new_version != trained.model_version
    path = tmp_path / "served.onnx"
    path.write_bytes(trained.model_bytes)
    server = start_server(model_path=path, reload_seconds=0.1)
    server.wait_ready()
    url = server.url

    with Traffic(url, body, threads=3, new_connections=False) as traffic:
        wait_until(lambda: len(traffic.results) > 200, 10, "traffic on the old model")
        replace_file(path, new_bytes)
        wait_until(lambda: traffic.results[-1][2] == new_version, 10, "the new model to serve")
        n_switched = len(traffic.results)
        wait_until(lambda: len(traffic.results) > n_switched + 200, 10, "traffic on the new one")
    assert traffic.results
    assert traffic.failures() == []  # zero failed requests across the switch
    versions = [v for _, _, v in sorted(traffic.results)]
    assert set(versions) == {trained.model_version, new_version}
    switch = versions.index(new_version)
    assert set(versions[switch + 10 :]) == {new_version}  # (answers in flight at the switch aside)

    doc = httpx.get(url + "/model").json()
    schemas.ModelInfo.model_validate(doc)
    assert doc["model_version"] == new_version
    assert doc["last_reload"]["result"] == "ok"
    assert doc["last_reload"]["reason"] == f"{trained.model_version} -> {new_version}"
    assert metric(url, "bnserve_model_reloads_total", result="ok") == 1
    assert metric(url, "bnserve_model_info", model_version=new_version) == 1
    assert metric(url, "bnserve_model_info", model_version=trained.model_version) == 0

    # A bad file in its place: refused after its checks, the model before keeps serving.
    with Traffic(url, body, threads=2, new_connections=False) as traffic:
        replace_file(path, new_bytes[: len(new_bytes) // 2])  # truncated
        wait_until(lambda: httpx.get(url + "/model").json()["last_reload"]["result"] == "failed",
                   10, "the bad file to be refused")
        time.sleep(0.3)
    assert traffic.failures() == []
    assert {v for _, _, v in traffic.results} == {new_version}
    doc = httpx.get(url + "/model").json()
    assert doc["model_version"] == new_version
    assert "is not a loadable ONNX model" in doc["last_reload"]["reason"]
    assert doc["last_reload"]["model_version"] == new_version
    assert metric(url, "bnserve_model_reloads_total", result="failed") == 1
    assert httpx.get(url + "/readyz").status_code == 200
    time.sleep(0.3)  # checked again and again: the same bad file is not retried
    assert metric(url, "bnserve_model_reloads_total", result="failed") == 1
    errors = [x["msg"] for x in server.json_logs() if x["level"] == "error"]
    assert len(errors) == 1
    assert errors[0].startswith("model reload failed: ")
    assert errors[0].endswith(f"still serving model version {new_version}")


@pytest.mark.slow
def test_with_reload_off_only_sighup_reloads_and_it_does_not_stop_the_server(
    start_server: Any, trained: Any, second_model: tuple[bytes, str], tmp_path: Path
) -> None:
    new_bytes, new_version = second_model
    path = tmp_path / "served.onnx"
    path.write_bytes(trained.model_bytes)
    server = start_server(model_path=path)  # one worker, BNSERVE_RELOAD_SECONDS unset (0)

    def version() -> str:
        served: str = httpx.get(server.url + "/model").json()["model_version"]
        return served

    server.wait_ready()
    replace_file(path, new_bytes)
    time.sleep(0.5)
    assert version() == trained.model_version  # not watched
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: version() == new_version, 10, "SIGHUP to reload the model")
    server.proc.send_signal(signal.SIGHUP)  # unchanged now: nothing to do
    time.sleep(0.3)
    assert server.proc.poll() is None
    assert metric(server.url, "bnserve_model_reloads_total", result="ok") == 1
    assert server.terminate() == 0
    msgs = [x["msg"] for x in server.json_logs()]
    assert msgs.count("SIGHUP received: checking the model file") == 2
    assert "model file unchanged since it was loaded: nothing to reload" in msgs


@pytest.mark.slow
def test_sighup_reloads_the_model_in_every_worker_without_restarting_them(
    start_server: Any, trained: Any, second_model: tuple[bytes, str], body: bytes,
    tmp_path: Path,
) -> None:
    new_bytes, new_version = second_model
    path = tmp_path / "served.onnx"
    path.write_bytes(trained.model_bytes)
    server = start_server(model_path=path, workers=2, metrics_dir=tmp_path / "prom")
    wait_until(lambda: len(ready_pids(server)) == 2, 60, "both workers to load the model")
    workers = set(ready_pids(server))

    def reloaded() -> set[int]:
        return {x["pid"] for x in server.json_logs() if x["msg"].startswith("model reloaded")}

    with Traffic(server.url, body, threads=2, new_connections=True) as traffic:
        replace_file(path, new_bytes)
        time.sleep(0.2)
        server.proc.send_signal(signal.SIGHUP)  # to the supervisor, as `kill -HUP` would
        wait_until(lambda: reloaded() == workers, 15, "each worker to reload", interval=0.1)
        n = len(traffic.results)
        wait_until(lambda: len(traffic.results) > n + 50, 10, "traffic after the reload")
    assert traffic.failures() == []
    assert traffic.results[-1][2] == new_version
    assert set(ready_pids(server)) == workers  # the same processes: reloaded, not restarted
    assert metric(server.url, "bnserve_model_reloads_total", result="ok") == 2
    assert metric(server.url, "bnserve_model_info", model_version=new_version) == 1
    assert metric(server.url, "bnserve_model_info", model_version=trained.model_version) == 0
    assert server.terminate() == 0


@pytest.mark.parametrize("batching", [False, True])
def test_a_request_finishes_on_the_model_it_started_with(
    trained: Any, second_model: tuple[bytes, str], tmp_path: Path, batching: bool
) -> None:
    """The switch lands while a request's body is still arriving: its answer must come from
    one model, the one whose version it carries."""
    second = tmp_path / "second.onnx"
    second.write_bytes(second_model[0])
    row = [float(v) for v in trained.x_val[3]]
    body = json.dumps({"features": row}).encode()

    async def run() -> dict[str, Any]:
        app = create_app(Settings(model_path=trained.path, batching=batching))
        await load_model(app.rt)
        new = Predictor.load(second)
        new.warm_up(8)
        first_half = asyncio.Event()
        sent: list[MutableMapping[str, Any]] = []
        parts = [body[:20], body[20:]]

        async def receive() -> dict[str, Any]:
            if len(parts) == 1:
                await first_half.wait()  # the rest of the body comes after the switch
            return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/predict",
                 "headers": [(b"content-type", b"application/json")]}
        request = asyncio.create_task(app(scope, receive, send))
        await asyncio.sleep(0.01)
        publish(app.rt, new)  # what a reload does
        first_half.set()
        await request
        assert sent[0]["status"] == 200
        answer: dict[str, Any] = json.loads(sent[1]["body"])
        return answer

    answer = asyncio.run(run())
    by_version = {trained.model_version: trained.path, second_model[1]: second}
    x = np.array([row], dtype=np.float32)
    probs, _ = Predictor.load(by_version[answer["model_version"]]).predict(x)
    assert [answer["probabilities"][c] for c in trained.class_names] == probs[0].tolist()


# ---------------------------------------------------------------- what GET /model shows


def test_model_document_shows_no_paths_or_library_versions_unless_asked(
    make_client: Any, trained: Any
) -> None:
    doc = make_client().get("/model").json()
    schemas.ModelInfo.model_validate(doc)
    assert str(trained.path) not in json.dumps(doc)
    assert doc["file"] == {"sha256": doc["file"]["sha256"], "size_bytes": len(trained.model_bytes)}
    assert set(doc["runtime"]) == {"intra_op_threads", "inter_op_threads"}
    assert doc["last_reload"] is None

    doc = make_client(expose_details=True).get("/model").json()
    schemas.ModelInfo.model_validate(doc)
    assert doc["file"]["path"] == str(trained.path)
    assert doc["runtime"]["providers"] == ["CPUExecutionProvider"]
    assert doc["runtime"]["onnxruntime"]


def test_a_missing_model_names_the_setting_and_the_path_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with TestClient(create_app(Settings(model_path=Path("models/nope.onnx")))) as client:
        wait_until(lambda: client.get("/readyz").json()["reason"].startswith("model not loaded"),
                   10, "the load to fail")
        r = client.post("/predict", json={"features": [1.0] * 30})
    assert r.status_code == 503
    message = r.json()["error"]["message"]
    assert "'models/nope.onnx' does not exist (BNSERVE_MODEL_PATH" in message
    assert str(tmp_path) not in message
