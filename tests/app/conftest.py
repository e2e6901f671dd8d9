"""Fixtures for the service tests: a freshly trained and exported model, in-process clients,
and real ``bnserve-serve`` processes on 127.0.0.1 and a free port (``start_server(model_path=...)``
serves another file). Also models of the other shapes the export contract allows, built here with
``onnx.helper`` from known weights, each with an independent numpy forward: an image classifier
[N, 3, 8, 8], a values model [N, 5, 40] -> [N, 5, 40], and a 1-D regression [N, 6] -> [N]."""

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
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

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


def start_process(model_path: Path, workdir: Path, **env_settings: Any) -> Server:
    """A running bnserve-serve on 127.0.0.1 and a free port, serving ``model_path`` (not waited
    for); ``env_settings`` are ``BNSERVE_*`` names or setting names. The caller stops it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("BNSERVE_") and k not in _ISOLATED_ENV}
    env.update({"BNSERVE_MODEL_PATH": str(model_path), "BNSERVE_PORT": str(port),
                "BNSERVE_HOST": "127.0.0.1", "BNSERVE_LOG_FORMAT": "json"})
    env.update({(k if k.startswith("BNSERVE_") else f"BNSERVE_{k.upper()}"): str(v)
                for k, v in env_settings.items()})
    log_path = workdir / f"server-{port}.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(serve_command(), env=env, cwd=workdir, stdout=out,
                                stderr=subprocess.STDOUT)
    return Server(proc, port, log_path)


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)


@pytest.fixture
def start_server(trained: Trained, tmp_path: Path) -> Iterator[StartServer]:
    """``start_server(**settings)`` -> a running bnserve-serve (not waited for); every process
    started is stopped (SIGTERM to its PID, then SIGKILL) at the end of the test."""
    servers: list[Server] = []

    def start(**settings: Any) -> Server:
        model = settings.pop("model_path", trained.path)
        server = start_process(model, tmp_path, **settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        stop(server)


# ---------------------------------------------------------------- models of any contract shape

Array = np.ndarray[Any, Any]
FOLD_REPORT = {
    "summary": "folded 1 of 1 BatchNormalization (1 into Conv); 0 left; 6 -> 5 nodes",
    "batchnorms": 1, "folded": 1, "into": {"Conv": 1}, "left": [], "nodes_before": 6,
    "nodes_after": 5,
}


@dataclass(frozen=True)
class ContractModel:
    """An ONNX file as bnserve-export writes it, and an independent float64 numpy forward."""

    name: str
    path: Path
    input_shape: tuple[int, ...]  # one example's dimensions
    output_kind: str
    class_names: list[str] | None
    feature_names: list[str] | None
    model_version: str
    forward: Callable[[Array], dict[str, Array]]  # float32 [N, ...] -> outputs by name, float64

    def examples(self, n: int, seed: int = 0) -> Array:
        return np.random.default_rng(seed).normal(size=(n, *self.input_shape)).astype(np.float32)


def _write_model(
    path: Path, nodes: list[onnx.NodeProto], weights: dict[str, Array],
    input_shape: tuple[int, ...], outputs: list[onnx.ValueInfoProto], meta: dict[str, str],
) -> None:
    graph = helper.make_graph(
        nodes, path.stem,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", *input_shape])],
        outputs, [numpy_helper.from_array(w if w.dtype == np.int64 else w.astype(np.float32), k)
                  for k, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="bnserve-tests")
    model.ir_version = 8
    helper.set_model_props(model, {"format": "bnserve-onnx/1", **meta})
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString())


def _classifier_outputs(n_classes: int) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_classes]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])]


def conv_reference(x: Array, w: Array, b: Array, pad: int) -> Array:
    """Cross-correlation as ONNX Conv (stride 1, no dilation), 1-D or 2-D, in float64."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    spatial = x.shape[2:]
    xp = np.pad(x, [(0, 0), (0, 0), *[(pad, pad)] * len(spatial)])
    out = np.zeros((x.shape[0], w.shape[0], *spatial))
    for k in np.ndindex(*w.shape[2:]):
        window = xp[(slice(None), slice(None), *(slice(i, i + n) for i, n in zip(k, spatial,
                                                                                 strict=True)))]
        out += np.einsum("oc,nc...->no...", w[(slice(None), slice(None), *k)], window)
    return out + b.reshape(1, -1, *[1] * len(spatial))


def _softmax(z: Array) -> Array:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p: Array = e / e.sum(axis=1, keepdims=True)
    return p


def build_image_classifier(path: Path) -> ContractModel:
    """Conv 3x3 (3 -> 4 channels, padded) -> Relu -> GlobalAveragePool -> Flatten -> Gemm ->
    Softmax / ArgMax: the classifier interface on [N, 3, 8, 8] images."""
    rng = np.random.default_rng(1)
    w = {"conv.W": rng.normal(0, 0.5, (4, 3, 3, 3)), "conv.B": rng.normal(0, 0.1, 4),
         "fc.W": rng.normal(0, 8.0, (3, 4))}
    # a bias that centres the logits on random images, so that every class gets predicted
    pooled = np.maximum(conv_reference(rng.normal(size=(256, 3, 8, 8)), w["conv.W"],
                                       w["conv.B"], pad=1), 0).mean(axis=(2, 3))
    w["fc.B"] = -(pooled @ w["fc.W"].T).mean(axis=0)
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [
        helper.make_node("Conv", ["features", "conv.W", "conv.B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc.W", "fc.B"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    classes = ["cat", "dog", "bird"]
    _write_model(path, nodes, w, (3, 8, 8), _classifier_outputs(3), {
        "model_version": "image-v1", "output_kind": "classifier",
        "class_names": json.dumps(classes), "fold_report": json.dumps(FOLD_REPORT),
        "source": "onnx:image.onnx sha256 0123abcd",
    })

    def forward(x: Array) -> dict[str, Array]:
        h = np.maximum(conv_reference(x, w["conv.W"], w["conv.B"], pad=1), 0).mean(axis=(2, 3))
        probs = _softmax(h @ w["fc.W"].T.astype(np.float64) + w["fc.B"])
        return {"probabilities": probs, "label": probs.argmax(axis=1)}

    return ContractModel("image", path, (3, 8, 8), "classifier", classes, None, "image-v1",
                         forward)


def build_sequence_values(path: Path) -> ContractModel:
    """Conv1d over 5 channels x 40 steps (padded) -> Relu -> MatMul over time + bias: a values
    model [N, 5, 40] -> [N, 5, 40], like a denoiser of sensor windows."""
    rng = np.random.default_rng(2)
    w = {"conv.W": rng.normal(0, 0.4, (5, 5, 3)), "conv.B": rng.normal(0, 0.1, 5),
         "mix.W": rng.normal(0, 0.2, (40, 40)), "mix.B": rng.normal(0, 0.1, 40)}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [
        helper.make_node("Conv", ["features", "conv.W", "conv.B"], ["c"], pads=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MatMul", ["r", "mix.W"], ["m"]),
        helper.make_node("Add", ["m", "mix.B"], ["values"]),
    ]
    out = [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["N", 5, 40])]
    _write_model(path, nodes, w, (5, 40), out, {
        "model_version": "seq-v1", "output_kind": "values",
        "fold_report": json.dumps(FOLD_REPORT), "source": "onnx:seq.onnx sha256 4567ef",
    })

    def forward(x: Array) -> dict[str, Array]:
        h = np.maximum(conv_reference(x, w["conv.W"], w["conv.B"], pad=1), 0)
        return {"values": h @ w["mix.W"].astype(np.float64) + w["mix.B"]}

    return ContractModel("sequence", path, (5, 40), "values", None, None, "seq-v1", forward)


def build_regression(path: Path) -> ContractModel:
    """Gemm [N, 6] -> [N, 1] -> Reshape [N]: a 1-D values model, one number per example,
    with feature names (so requests may name the features)."""
    rng = np.random.default_rng(3)
    w = {"W": rng.normal(0, 1.0, (6, 1)), "B": rng.normal(0, 1.0, 1)}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [helper.make_node("Gemm", ["features", "W", "B"], ["y"]),
             helper.make_node("Reshape", ["y", "flat"], ["values"])]
    features = [f"x{i}" for i in range(6)]
    out = [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["N"])]
    _write_model(path, nodes, {**w, "flat": np.array([-1], dtype=np.int64)}, (6,), out, {
        "model_version": "reg-v1", "output_kind": "values", "feature_names": json.dumps(features),
    })

    def forward(x: Array) -> dict[str, Array]:
        return {"values": (x.astype(np.float64) @ w["W"] + w["B"])[:, 0]}

    return ContractModel("regression", path, (6,), "values", None, features, "reg-v1", forward)


@pytest.fixture(scope="session")
def contract_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ContractModel]:
    out = tmp_path_factory.mktemp("contract")
    return {m.name: m for m in (build_image_classifier(out / "image.onnx"),
                                build_sequence_values(out / "sequence.onnx"),
                                build_regression(out / "regression.onnx"))}


@pytest.fixture(scope="session")
def image_model(contract_models: dict[str, ContractModel]) -> ContractModel:
    return contract_models["image"]


@pytest.fixture(scope="session")
def values_model(contract_models: dict[str, ContractModel]) -> ContractModel:
    return contract_models["sequence"]
