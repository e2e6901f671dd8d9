"""wrk as the load generator: installed if missing, driven by a Lua script, results as JSON.

wrk is C with an event loop per thread; one thread keeps 64 connections busy at well over the
ceiling's rate, so it is not the bottleneck, and a single thread leaves the other core of a
2-core machine to the server. The Lua script cycles through real request bodies (validation
rows; JSON, or binary tensor data with its own headers), pre-formatted once, and its ``done``
hook prints the summary and latency percentiles.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MARKER = "BENCH_JSON "
_LUA_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,'
    .. '"errors":%d,"non_2xx":%d}\\n',
    "BENCH_JSON ", summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), latency.mean, e.connect + e.read + e.write + e.timeout, e.status))
end
"""


@dataclass(frozen=True)
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors and timeouts plus non-2xx answers

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def ensure_wrk() -> str:
    """The benchmark's own set-up: ``apt-get install wrk`` (Debian) when it is not installed."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("wrk is missing and installing it needs root: sudo apt-get install wrk")
    print("wrk not found: installing it with apt-get (Debian package 'wrk')", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, timeout=300)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is still missing after apt-get install wrk")
    return found


@dataclass(frozen=True)
class Body:
    """One request: its body and its own headers (wrk adds Host and Content-Length)."""

    data: bytes
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)


# Lua quoted-string escapes: printable ASCII stays as it is but for " and \, every other byte
# becomes a three-digit decimal escape (three digits, so a digit after it is never read into it).
_LUA_ESCAPES = {b: f"\\{b:03d}" for b in range(256) if not 32 <= b < 127}
_LUA_ESCAPES |= {ord('"'): '\\"', ord("\\"): "\\\\"}


def lua_string(data: bytes) -> str:
    """``data`` as a Lua string literal that reads back as exactly these bytes. Not a long
    string ([==[ ]==]): Lua turns a CR LF in one into LF and drops a leading newline, and any
    level of ``=`` can occur in binary tensor data."""
    return '"' + data.decode("latin-1").translate(_LUA_ESCAPES) + '"'


def _lua_table(headers: tuple[tuple[str, str], ...]) -> str:
    return "{" + ", ".join(f"[{lua_string(k.encode())}] = {lua_string(v.encode())}"
                           for k, v in headers) + "}"


def write_script(path: Path, bodies: Sequence[bytes | Body], route: str = "/predict") -> Path:
    """A wrk script posting ``bodies`` to ``route`` in turn, each pre-formatted once with its
    own headers; a plain ``bytes`` body is sent as JSON."""
    items = ",\n".join(
        f"{{{lua_string(b.data)}, {_lua_table(b.headers)}}}"
        for b in (x if isinstance(x, Body) else Body(x) for x in bodies))
    path.write_text(f"""local bodies = {{
{items}
}}
local reqs = {{}}
local i = 0
init = function(args)
  for k, b in ipairs(bodies) do
    reqs[k] = wrk.format("POST", {lua_string(route.encode())}, b[2], b[1])
  end
end
request = function()
  i = i % #reqs + 1
  return reqs[i]
end
{_LUA_DONE}""", encoding="ascii")
    return path


def run(wrk: str, url: str, script: Path, connections: int, seconds: int) -> Result:
    out = subprocess.run(
        [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script),
         url],
        capture_output=True, text=True, timeout=seconds + 30, check=True,
    ).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith(MARKER)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    doc = json.loads(line[len(MARKER):])
    return Result(doc["requests"], doc["duration_us"] / 1e6, doc["p50_us"] / 1000,
                  doc["p99_us"] / 1000, doc["errors"] + doc["non_2xx"])
