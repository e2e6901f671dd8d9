"""BNSERVE_LOG_FORMAT=auto (the default): human-readable text when stdout is a terminal, JSON lines
otherwise; json and text force one. Checked on a real bnserve-serve writing to a pseudo-terminal
and to a pipe."""

from __future__ import annotations

import io
import json
import os
import pty
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import httpx
import pytest

from app.logs import AccessLog, config_dict, resolve_format
from app.settings import Settings
from tests.app.conftest import Trained, free_port, serve_command


@pytest.fixture
def terminal() -> Iterator[TextIO]:
    """A writable text stream on a pseudo-terminal (isatty() is true)."""
    master, slave = pty.openpty()
    with open(slave, "w", closefd=True) as tty:
        yield tty
    os.close(master)


def test_auto_is_the_default_and_follows_the_stream(terminal: TextIO) -> None:
    assert Settings.model_fields["log_format"].default == "auto"
    assert terminal.isatty()
    assert resolve_format("auto", terminal) == "text"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("json", terminal) == "json"  # set explicitly: always that
    assert resolve_format("text", io.StringIO()) == "text"
    assert AccessLog("info", "auto", stream=terminal).json is False
    assert AccessLog("info", "auto", stream=io.StringIO()).json is True
    with pytest.raises(ValueError, match="expected auto, json or text"):
        resolve_format("xml")


def test_config_dict_resolves_auto_against_stdout(
    terminal: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    def formatter() -> str:
        name: str = config_dict("info", "auto")["formatters"]["default"]["()"]
        return name.rsplit(".", 1)[1]

    monkeypatch.setattr("sys.stdout", terminal)
    assert formatter() == "TextFormatter"
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert formatter() == "JsonFormatter"


def _serve(model: Path, cwd: Path, stdout: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("BNSERVE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(BNSERVE_MODEL_PATH=str(model), BNSERVE_PORT=str(port), BNSERVE_HOST="127.0.0.1")
    proc = subprocess.Popen(serve_command(), env=env, cwd=cwd, stdout=stdout,
                            stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _exercise(proc: subprocess.Popen[bytes], url: str) -> None:
    """Wait until ready, ask for the model (an access line), then stop with SIGTERM."""
    try:
        for _ in range(600):
            assert proc.poll() is None, "the server exited"
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        assert httpx.get(url + "/model", headers={"x-request-id": "tty-1"}).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.slow
def test_a_real_server_writes_text_to_a_terminal_and_json_to_a_pipe(
    trained: Trained, tmp_path: Path
) -> None:
    # On a pseudo-terminal: the parent keeps the master end and reads everything written.
    master, slave = pty.openpty()
    proc, url = _serve(trained.path, tmp_path, slave)
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _exercise(proc, url)
        reader.join(10)
    finally:
        os.close(master)
    lines = [line for line in b"".join(chunks).decode().splitlines() if line.strip()]
    assert lines, "nothing was written to the terminal"
    assert not [line for line in lines if line.lstrip().startswith("{")], lines
    assert any(" INFO    bnserve.cli starting bnserve: " in line for line in lines), lines
    assert any(" INFO    bnserve.access GET /model 200 request_id=tty-1 latency_ms=" in line
               for line in lines), lines

    # To a pipe: JSON lines, every one of them.
    proc, url = _serve(trained.path, tmp_path, subprocess.PIPE)
    out = b""
    try:
        _exercise(proc, url)
    finally:
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.stdout.close()
    docs = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert any(d["logger"] == "bnserve.cli" and d["msg"].startswith("starting bnserve")
               for d in docs)
    assert [d["status"] for d in docs if d.get("request_id") == "tty-1"] == [200]
