"""``make bench``: bnserve's POST /predict against the stack's ceiling, a naive wrapper and the
floor, at concurrency 1, 16 and 64, with and without adaptive batching, 1 and 2 workers, on the
default model, a wide one and an image model (a small ResNet imported from PyTorch); and its Open
Inference Protocol (V2) endpoint, JSON and binary, against /predict and against KServe's own
Python model server on the same ONNX file (in a venv of its own: benchmarks/kserve_env.py).
Writes reports/bench.json and prints the tables and the targets.

All servers run at once on 127.0.0.1 (idle ones cost nothing) and are measured in rounds, each
round visiting every target in a rotated order, so drift (thermal, noisy neighbours) hits all
alike; a cell's figures are the median over rounds. The load generator is wrk with one thread.
bnserve runs with its defaults: one JSON access-log line per request, written to a file here;
the ceiling and the naive wrapper log nothing (see benchmarks/servers/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath
from typing import Any

import drift_ab
import floor
import image_model
import kserve_env
import loadgen
import numpy as np
import orjson
import targets
import wide_model
from procs import Server
from targets import NO_DRIFT

from app.settings import Settings
from model_export import checkpoint

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVERS = Path(__file__).resolve().parent / "servers"
CONCURRENCY = (1, 16, 64)


@dataclass(frozen=True)
class Target:
    key: str  # e.g. "default/bnserve"
    model: str  # "default" or "wide"
    label: str
    server: Server
    path: str = "/predict"  # the route its script posts to
    script: str = ""  # its wrk script's key, when not the model's (/predict) one


@dataclass
class Cell:
    key: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # server CPU (all its processes) per request
    errors: int
    rounds: list[dict[str, float]]


def rows_of(ckpt: Path, n: int) -> list[bytes]:
    _, _, x, _ = checkpoint.load(ckpt)
    return [orjson.dumps({"features": [float(v) for v in row]}) for row in x[:n]]


def v2_rows_of(ckpt: Path, n: int, binary: bool) -> list[loadgen.Body]:
    """The same rows as rows_of, as Open Inference Protocol requests (POST
    /v2/models/<name>/infer). JSON: the numbers as rows_of writes them, Content-Type
    application/json, outputs answered in JSON. Binary: what tritonclient (2.73) sends for a
    binary input when the caller names no output: no Content-Type, the JSON header's length in
    Inference-Header-Content-Length, the row's float32 bytes (little-endian) after the header,
    and every output asked for in binary ("binary_data_output": true)."""
    _, _, x, _ = checkpoint.load(ckpt)
    bodies = []
    for row in x[:n]:
        tensor: dict[str, Any] = {"name": "features", "shape": [1, len(row)], "datatype": "FP32"}
        if not binary:
            tensor["data"] = [float(v) for v in row]
            bodies.append(loadgen.Body(orjson.dumps({"inputs": [tensor]})))
            continue
        data = np.asarray(row, dtype="<f4").tobytes()
        tensor["parameters"] = {"binary_data_size": len(data)}
        head = orjson.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
        bodies.append(loadgen.Body(head + data,
                                   (("Inference-Header-Content-Length", str(len(head))),)))
    return bodies


def bnserve(name: str, model: Path, log_dir: Path, workers: int = 1,
            batching: bool = False, drift: bool = True,
            extra_env: dict[str, str] | None = None) -> Server:
    argv = [str(BIN / "bnserve-serve"), "--port", "{port}", "--model-path", str(model),
            "--workers", str(workers), "--host", "127.0.0.1"]
    env = {"BNSERVE_BATCHING": "true" if batching else "false",
           "BNSERVE_DRIFT": "true" if drift else "false", **(extra_env or {})}  # drift on: default
    return Server(name, argv, env, log_dir / f"{name.replace('/', '_')}.log", workers)


def script_server(name: str, script: str, log_dir: Path, model: Path | None = None,
                  stock_http: bool = False) -> Server:
    argv = [sys.executable, str(SERVERS / script), "--port", "{port}"]
    if model is not None:
        argv += ["--model", str(model)]
    if stock_http:
        argv.append("--stock-http")
    return Server(name, argv, {}, log_dir / f"{name.replace('/', '_')}.log")


def kserve(name: str, python: Path, model: Path, log_dir: Path) -> Server:
    """KServe's model server (benchmarks/servers/kserve_onnx.py) in its own venv's ``python``,
    serving ``model`` as /v2/models/<file stem>, as bnserve names it."""
    argv = [str(python), str(SERVERS / "kserve_onnx.py"), "--http_port", "{port}",
            "--enable_grpc", "false", "--model_name", model.stem, "--model_path", str(model)]
    return Server(name, argv, {}, log_dir / f"{name.replace('/', '_')}.log",
                  ready_path=f"/v2/models/{model.stem}/ready")


def measure_cell(wrk: str, t: Target, script: Path, c: int, seconds: int,
                 warmup: int) -> dict[str, float]:
    url = t.server.url + t.path
    loadgen.run(wrk, url, script, c, warmup)
    cpu0 = t.server.cpu()
    r = loadgen.run(wrk, url, script, c, seconds)
    cpu = t.server.cpu() - cpu0
    return {"rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
            "cpu_us": cpu / max(r.requests, 1) * 1e6, "errors": r.errors, "requests": r.requests}


def memory_check(wrk: str, server: Server, script: Path, total: int) -> dict[str, Any]:
    """RSS per worker before, after a first chunk, and after ``total`` requests at c=16."""
    before = server.rss()
    done, after_chunks = 0, []
    while done < total:
        r = loadgen.run(wrk, server.url + "/predict", script, 16, 5)
        done += r.requests
        after_chunks.append({"requests": done, "rss_mib": server.rss(), "errors": r.errors})
    first, last = after_chunks[0]["rss_mib"], after_chunks[-1]["rss_mib"]
    return {"rss_ready_mib": before, "chunks": after_chunks, "requests": done,
            "growth_after_first_chunk_mib": max(b - a for a, b in zip(first, last, strict=True))}


def cold_starts(model: Path, log_dir: Path, n: int) -> list[float]:
    times = []
    for i in range(n):
        s = bnserve(f"cold-{i}", model, log_dir)
        s.start()
        times.append(s.ready_seconds)
        s.stop()
    return times


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                  if ln.startswith("Model name")), platform.processor())
    budget = Settings().cpu_budget()
    return {"cpu_model": model, "cpus": os.cpu_count(), "cpu_budget": budget.describe(),
            "python": platform.python_version(), "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=3, help="measured seconds per cell")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured seconds before each cell")
    p.add_argument("--drift-rounds", type=int, default=10,
                   help="rounds of the drift monitoring A/B (benchmarks/drift_ab.py)")
    p.add_argument("--drift-only", action="store_true",
                   help="only the drift monitoring cost (A/B and in-process), into "
                   "reports/bench-drift.json unless --out says otherwise (make bench-drift)")
    p.add_argument("--drift-sample-every", type=int, default=None,
                   help="BNSERVE_DRIFT_SAMPLE_EVERY of the A/B's servers with monitoring on "
                   "(default: the service's own)")
    p.add_argument("--memory-requests", type=int, default=200_000)
    p.add_argument("--out", type=Path, default=None, help="reports/bench.json by default")
    p.add_argument("--kserve-venv", type=Path, default=kserve_env.VENV,
                   help="KServe's own venv, made on first use")
    args = p.parse_args(argv)
    for key in list(os.environ):  # the servers' settings are this script's, not the caller's
        if key.startswith("BNSERVE_") or key == "PROMETHEUS_MULTIPROC_DIR":
            del os.environ[key]
    os.chdir(ROOT)
    started = time.time()
    wrk = loadgen.ensure_wrk()
    if args.drift_only:
        return drift_only(args, wrk)
    args.out = args.out or ROOT / "reports" / "bench.json"
    kserve_python, kserve_install = kserve_env.ensure(args.kserve_venv)
    kserve_versions = kserve_env.versions(kserve_python)
    print("KServe venv: " + ", ".join(f"{k} {v}" for k, v in kserve_versions.items()),
          flush=True)
    default_model = ROOT / "models" / "default.onnx"
    v2_path = f"/v2/models/{default_model.stem}/infer"
    default_ckpt = ROOT / "models" / "default.ckpt"
    wide = wide_model.build(ROOT / "models")
    image = image_model.build(ROOT / "models")
    image_rows = image_model.rows()
    work = Path(tempfile.mkdtemp(prefix="bnserve-bench-"))
    scripts = {
        "default": loadgen.write_script(work / "default.lua", rows_of(default_ckpt, 113)),
        "default-v2-json": loadgen.write_script(
            work / "default-v2-json.lua", v2_rows_of(default_ckpt, 113, binary=False), v2_path),
        "default-v2-binary": loadgen.write_script(
            work / "default-v2-binary.lua", v2_rows_of(default_ckpt, 113, binary=True), v2_path),
        "wide": loadgen.write_script(work / "wide.lua", rows_of(wide.with_suffix(".ckpt"), 100)),
        "image": loadgen.write_script(work / "image.lua", image_rows),
    }
    print("floor: ONNX Runtime run() for one example, in-process", flush=True)
    floors = {
        "default": floor.measure(default_model, checkpoint.load(default_ckpt)[2]),
        "wide": floor.measure(wide, checkpoint.load(wide.with_suffix(".ckpt"))[2]),
        "image": floor.measure(image, np.load(image_model.FIXTURE / "resnet_basic.inputs.npy")),
    }
    print("image model: where one request's time goes, in-process", flush=True)
    image_split = image_model.time_split(image, image_rows)
    bnserve_default = bnserve("bnserve", default_model, work)
    targets_ = [
        Target("default/bare", "default", "bare ASGI (ceiling)",
               script_server("bare", "bare_asgi.py", work)),
        # The same app on uvicorn's own protocol: what bnserve's write coalescing adds.
        Target("default/bare-stock", "default", "bare ASGI, uvicorn's stock protocol",
               script_server("bare-stock", "bare_asgi.py", work, stock_http=True)),
        Target("default/naive", "default", "naive FastAPI",
               script_server("naive", "naive_fastapi.py", work, default_model)),
        Target("default/bnserve", "default", "bnserve", bnserve_default),
        # The Open Inference Protocol on the same server process, and KServe's own server.
        Target("default/bnserve-v2-json", "default", "bnserve V2 JSON", bnserve_default,
               v2_path, "default-v2-json"),
        Target("default/bnserve-v2-binary", "default", "bnserve V2 binary", bnserve_default,
               v2_path, "default-v2-binary"),
        Target("default/kserve", "default", "KServe python server (V2 JSON)",
               kserve("kserve", kserve_python, default_model, work), v2_path, "default-v2-json"),
        Target("default/bnserve+batching", "default", "bnserve, batching",
               bnserve("bnserve-batching", default_model, work, batching=True)),
        # The same server twice: how far two identical cells differ is this machine's noise.
        Target("default/bnserve-control", "default", "bnserve again (noise control)",
               bnserve("bnserve-control", default_model, work)),
        # Issue 13: what drift monitoring (on by default, so in every other bnserve row) costs.
        Target(NO_DRIFT, "default", "bnserve, drift monitoring off",
               bnserve("bnserve-nodrift", default_model, work, drift=False)),
        Target("default/bnserve-2w", "default", "bnserve, 2 workers",
               bnserve("bnserve-2w", default_model, work, workers=2)),
        Target("default/bnserve-2w+batching", "default", "bnserve, 2 workers, batching",
               bnserve("bnserve-2w-batching", default_model, work, workers=2, batching=True)),
        Target("wide/naive", "wide", "naive FastAPI",
               script_server("naive-wide", "naive_fastapi.py", work, wide)),
        Target("wide/bnserve", "wide", "bnserve", bnserve("bnserve-wide", wide, work)),
        Target("wide/bnserve+batching", "wide", "bnserve, batching",
               bnserve("bnserve-wide-batching", wide, work, batching=True)),
        Target("image/naive", "image", "naive FastAPI",
               script_server("naive-image", "naive_fastapi.py", work, image)),
        Target("image/bnserve", "image", "bnserve", bnserve("bnserve-image", image, work)),
        Target("image/bnserve+batching", "image", "bnserve, batching",
               bnserve("bnserve-image-batching", image, work, batching=True)),
    ]
    servers: dict[str, dict[str, Any]] = {}
    try:
        for t in targets_:
            if t.server.proc is not None:
                continue  # another target on a server already started
            t.server.start()
            servers[t.key] = {"ready_seconds": t.server.ready_seconds,
                              "rss_ready_mib": t.server.rss(), "workers": t.server.workers}
            print(f"started {t.key}: ready in {t.server.ready_seconds:.2f} s", flush=True)
        rounds: dict[tuple[str, int], list[dict[str, float]]] = {}
        for r in range(args.rounds):
            for c in CONCURRENCY:
                shift = r % len(targets_)
                for t in targets_[shift:] + targets_[:shift]:
                    cell = measure_cell(wrk, t, scripts[t.script or t.model], c, args.seconds,
                                        args.warmup)
                    rounds.setdefault((t.key, c), []).append(cell)
                    print(f"round {r + 1}/{args.rounds} c={c:<3} {t.key:<28} "
                          f"{cell['rps']:9.0f} req/s  p50 {cell['p50_ms']:.3f} ms  "
                          f"p99 {cell['p99_ms']:.3f} ms  {cell['cpu_us']:.0f} us CPU/req",
                          flush=True)
        drift = drift_ab_run(args, wrk, work)
        print(f"memory: {args.memory_requests} requests at c=16", flush=True)
        by_key = {t.key: t for t in targets_}
        memory = {key: memory_check(wrk, by_key[key].server, scripts["default"],
                                    args.memory_requests)
                  for key in ("default/bnserve", "default/bnserve+batching")}
    finally:
        for t in targets_:
            t.server.stop()
    colds = cold_starts(default_model, work, 3)
    shutil.rmtree(work, ignore_errors=True)  # wrk scripts and server logs
    cells = [Cell(key, c, *(statistics.median(x[f] for x in rs)
                            for f in ("rps", "p50_ms", "p99_ms", "cpu_us")),
                  sum(int(x["errors"]) for x in rs), rs)
             for (key, c), rs in rounds.items()]
    result = {
        "machine": machine(), "settings": vars(args) | {"out": str(args.out)},
        "wrk": subprocess.run([wrk, "-v"], capture_output=True, text=True,
                              check=False).stdout.strip().splitlines()[0],
        "labels": {t.key: t.label for t in targets_},
        "kserve": {"venv": str(args.kserve_venv), "versions": kserve_versions,
                   "install_seconds": kserve_install},
        "floor": floors, "image_time_split_us": image_split, "servers": servers,
        "cells": [asdict(c) for c in cells],
        "drift_ab": drift, "memory": memory, "cold_start_seconds": colds,
        "wall_seconds": time.time() - started,
    }
    result["targets"] = targets.check(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=_json_default))
    print()
    print(targets.report(result))
    print(f"\nresults: {args.out}")
    return 0


def drift_ab_run(args: argparse.Namespace, wrk: str, work: Path) -> dict[str, Any]:
    """benchmarks/drift_ab.py on the default model: in-process, then the A/B."""
    model, ckpt = ROOT / "models" / "default.onnx", ROOT / "models" / "default.ckpt"
    print("drift monitoring: a watched run against a plain one, in-process", flush=True)
    every = args.drift_sample_every
    inprocess = drift_ab.inprocess(model, checkpoint.load(ckpt)[2], every)
    script = loadgen.write_script(work / "drift-ab.lua", rows_of(ckpt, 113))
    print(f"drift monitoring A/B: {args.drift_rounds} rounds at c=16", flush=True)
    env = {} if every is None else {"BNSERVE_DRIFT_SAMPLE_EVERY": str(every)}
    result = drift_ab.ab(
        lambda name, on: bnserve(name, model, work, drift=on, extra_env=env),
        lambda server: measure_cell(wrk, Target("drift-ab", "default", "drift A/B", server),
                                    script, 16, args.seconds, args.warmup),
        args.drift_rounds)
    return result | {"inprocess": inprocess}


def drift_only(args: argparse.Namespace, wrk: str) -> int:
    """``make bench-drift``: the drift monitoring cost alone (a few minutes, not 25)."""
    out = args.out or ROOT / "reports" / "bench-drift.json"
    work = Path(tempfile.mkdtemp(prefix="bnserve-bench-drift-"))
    try:
        drift = drift_ab_run(args, wrk, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"machine": machine(), "settings": vars(args) | {"out": str(out)},
              "drift_ab": drift}
    result["targets"] = targets.check_drift(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=_json_default))
    print()
    print("\n".join([*targets.drift_lines(drift), "",
                     *map(targets.target_line, result["targets"])]))
    print(f"\nresults: {out}")
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PurePath):  # paths among the settings (e.g. --kserve-venv)
        return str(value)
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    sys.exit(main())
