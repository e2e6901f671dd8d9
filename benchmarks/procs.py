"""Server processes under test: start on a free 127.0.0.1 port, time to ready, CPU and memory
from /proc (summed over the process and its children, so several workers count in full)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields after "pid (comm)", from state on


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, IndexError):
                continue  # gone meanwhile
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Server:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    workers: int = 1
    ready_path: str = "/readyz"  # answers 200 once the server can serve
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    ready_seconds: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        """Start and wait for GET ``ready_path`` 200; ``ready_seconds`` is process start to
        ready."""
        env = {**os.environ, **self.env}
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        t0 = time.perf_counter()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=1) as r:
                    if r.status == 200:
                        self.ready_seconds = time.perf_counter() - t0
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.002)
        else:
            self.stop()
            raise RuntimeError(f"{self.name} not ready in {timeout} s")
        if self.workers > 1:  # ready answered by one worker: wait until all are up
            while len(self.workers_pids()) < self.workers and time.perf_counter() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # and for the others to finish loading their model

    def pids(self) -> list[int]:
        assert self.proc is not None
        return tree(self.proc.pid)

    def workers_pids(self) -> list[int]:
        """The processes that serve requests: the process itself, or a supervisor's workers."""
        assert self.proc is not None
        if self.workers == 1:
            return [self.proc.pid]
        return [p for p in self.pids() if p != self.proc.pid and _is_worker(p)]

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def rss(self) -> list[float]:
        return [rss_mib(p) for p in self.workers_pids()]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _is_worker(pid: int) -> bool:
    """uvicorn workers are multiprocessing spawn children; skip its resource tracker."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"resource_tracker" not in cmd
