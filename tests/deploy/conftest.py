"""Fixtures for the deployment tests: a trained model on disk and a real bnserve-serve process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from model_export import checkpoint, data, export, train

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ModelFiles:
    checkpoint: Path
    onnx: Path


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    out = tmp_path_factory.mktemp("model")
    res = train.train(data.load_default(), train.TrainConfig(), log=lambda _: None)
    checkpoint.save(out / "m.ckpt", res.net, res.meta, res.x_val, res.y_val)
    net, meta, vx, _ = checkpoint.load(out / "m.ckpt")
    (out / "m.onnx").write_bytes(export.export(net, meta, vx, log=lambda _: None).model_bytes)
    return ModelFiles(out / "m.ckpt", out / "m.onnx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def server(model_files: ModelFiles, tmp_path: Path) -> Iterator[str]:
    """``bnserve-serve`` on 127.0.0.1 and a free port, ready; stopped by PID afterwards."""
    port = free_port()
    env = {
        **os.environ,
        "BNSERVE_MODEL_PATH": str(model_files.onnx),
        "BNSERVE_PORT": str(port),
        "BNSERVE_HOST": "127.0.0.1",
        "BNSERVE_LOG_LEVEL": "warning",
    }
    serve = shutil.which("bnserve-serve", path=str(Path(sys.executable).parent))
    assert serve is not None, "bnserve-serve is not installed in this environment"
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([serve], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready in 30 s"
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
