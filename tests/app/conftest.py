"""Fixtures for the service tests: a freshly trained and exported model, in-process clients,
and real ``bnserve-serve`` processes on 127.0.0.1 and a free port."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from model_export import data, export, mlp, train

_ISOLATED_ENV = ("PROMETHEUS_MULTIPROC_DIR",)


@dataclass(frozen=True)
class Trained:
    path: Path
    model_bytes: bytes
    result: train.TrainResult
    feature_names: list[str]
    class_names: list[str]
    model_version: str

    @property
    def x_val(self) -> np.ndarray[Any, np.dtype[np.float64]]:
        return self.result.x_val

    def reference(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float64]]:
        """The numpy inference-mode forward on exactly the float32 values the model sees."""
        x2 = np.atleast_2d(np.asarray(x, dtype=np.float64))
        return mlp.forward_infer(self.result.net, x2.astype(np.float32).astype(np.float64))


def wait_ready(client: TestClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.005)
    raise AssertionError(f"not ready after {timeout} s: {client.get('/readyz').json()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve_command() -> list[str]:
    exe = Path(sys.executable).parent / "bnserve-serve"
    found = str(exe) if exe.exists() else shutil.which("bnserve-serve")
    assert found, "bnserve-serve is not installed (pip install -e '.[dev]')"
    return [found]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[str]:
        """Complete lines only: the server may be writing the last one right now."""
        text = self.log_path.read_text()
        return text[: text.rfind("\n") + 1].splitlines()

    def json_logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_lines() if line.strip()]

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n"
                                     + self.log_path.read_text())
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("server not ready in time:\n" + self.log_path.read_text())

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                httpx.get(self.url + "/livez", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError("server not listening in time:\n" + self.log_path.read_text())

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    res = train.train(data.load_default(), train.TrainConfig(), log=lambda s: None)
    meta = {**res.meta, "hidden": list(train.TrainConfig().hidden)}
    exp = export.export(res.net, meta, res.x_val, log=lambda s: None)
    path = tmp_path_factory.mktemp("model") / "default.onnx"
    path.write_bytes(exp.model_bytes)
    return Trained(
        path=path, model_bytes=exp.model_bytes, result=res,
        feature_names=list(res.meta["feature_names"]), class_names=list(res.meta["class_names"]),
        model_version=export.default_version(res.net),
    )


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the environment: keep the developer's BNSERVE_* out of the tests."""
    for key in list(os.environ):
        if key.startswith("BNSERVE_") or key in _ISOLATED_ENV:
            monkeypatch.delenv(key)


MakeClient = Callable[..., TestClient]


@pytest.fixture
def make_client(trained: Trained) -> Iterator[MakeClient]:
    """``make_client(**settings)`` -> a started TestClient (lifespan running); closed at the end."""
    clients: list[TestClient] = []

    def make(ready: bool = True, **overrides: Any) -> TestClient:
        settings = Settings(**{"model_path": trained.path, **overrides})
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        if ready:
            wait_ready(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    return make_client()


# ---------------------------------------------------------------- real server processes


StartServer = Callable[..., Server]


@pytest.fixture
def start_server(trained: Trained, tmp_path: Path) -> Iterator[StartServer]:
    """``start_server(**settings)`` -> a running bnserve-serve (not waited for); every process
    started is stopped (SIGTERM to its PID, then SIGKILL) at the end of the test."""
    servers: list[Server] = []

    def start(**settings: Any) -> Server:
        port = free_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("BNSERVE_") and k not in _ISOLATED_ENV}
        env.update({"BNSERVE_MODEL_PATH": str(trained.path), "BNSERVE_PORT": str(port),
                    "BNSERVE_HOST": "127.0.0.1", "BNSERVE_LOG_FORMAT": "json"})
        env.update({f"BNSERVE_{k.upper()}": str(v) for k, v in settings.items()})
        log_path = tmp_path / f"server-{len(servers)}.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(serve_command(), env=env, cwd=tmp_path, stdout=out,
                                    stderr=subprocess.STDOUT)
        server = Server(proc, port, log_path)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(15)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait(5)



