"""wrk as the load generator: installed if missing, driven by a Lua script, results as JSON.

wrk is C with an event loop per thread; one thread keeps 64 connections busy at well over the
ceiling's rate, so it is not the bottleneck, and a single thread leaves the other core of a
2-core machine to the server. The Lua script cycles through real request bodies (validation
rows), pre-formatted once, and its ``done`` hook prints the summary and latency percentiles.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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


def write_script(path: Path, bodies: list[bytes], route: str = "/predict") -> Path:
    """A wrk script posting ``bodies`` in turn, each in a Lua long string of level 2: nested JSON
    lists end in ']]', which would close a level-0 one."""
    assert all(b"]==]" not in b for b in bodies)
    items = ",\n".join(f"[==[{b.decode()}]==]" for b in bodies)
    path.write_text(f"""local bodies = {{
{items}
}}
local reqs = {{}}
local i = 0
init = function(args)
  for k, b in ipairs(bodies) do
    reqs[k] = wrk.format("POST", "{route}", {{["Content-Type"] = "application/json"}}, b)
  end
end
request = function()
  i = i % #reqs + 1
  return reqs[i]
end
{_LUA_DONE}""")
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
