"""The issue's targets checked against a result, and the tables printed (markdown, for README).

Every ratio is paired: the median over rounds of (this server's req/s / the other's req/s) in the
same round, so drift between rounds cancels. The noise control (bnserve measured twice as two
identical servers) shows how far a ratio of 1 can stray on this machine.
"""

from __future__ import annotations

import statistics
from typing import Any

MEMORY_FLAT_MIB = 5.0  # RSS growth over the memory run still called flat (allocator noise)
V2_JSON, V2_BINARY = "default/bnserve-v2-json", "default/bnserve-v2-binary"
KSERVE = "default/kserve"  # KServe's own Python server, V2 JSON, the same ONNX file
NO_DRIFT = "default/bnserve-nodrift"  # BNSERVE_DRIFT=false; every other bnserve row monitors


def cell(result: dict[str, Any], key: str, c: int) -> dict[str, Any]:
    return next(x for x in result["cells"] if x["key"] == key and x["concurrency"] == c)


def _ratios(result: dict[str, Any], key: str, base: str, c: int) -> list[float]:
    pairs = zip(cell(result, key, c)["rounds"], cell(result, base, c)["rounds"], strict=True)
    return [float(a["rps"] / b["rps"]) for a, b in pairs]


def _ratio(result: dict[str, Any], key: str, base: str, c: int) -> float:
    return statistics.median(_ratios(result, key, base, c))


def _target(name: str, measured: float, limit: float, at_least: bool, unit: str = "",
            strict: bool = False) -> dict[str, Any]:
    if at_least:
        met = measured > limit if strict else measured >= limit
    else:
        met = measured < limit if strict else measured <= limit
    op = (">" if at_least else "<") + ("" if strict else "=")
    return {"target": name, "limit": f"{op} {limit:g}{unit}", "measured": round(measured, 4),
            "unit": unit, "met": met}


def check(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target: what it asks, what was measured, met or not."""
    out: list[dict[str, Any]] = []

    def add(name: str, measured: float, limit: float, at_least: bool, unit: str = "",
            strict: bool = False) -> None:
        out.append(_target(name, measured, limit, at_least, unit, strict))

    bn, bnb = "default/bnserve", "default/bnserve+batching"
    # A server that answered errors was measured answering errors: no ratio against it holds.
    errors = {f"{c['key']} c={c['concurrency']}": c["errors"]
              for c in result["cells"] if c["errors"]}
    add("cells with failed requests" + (f" ({', '.join(sorted(errors))})" if errors else ""),
        len(errors), 0, False)
    add("c=16 req/s vs bare ASGI", _ratio(result, bn, "default/bare", 16), 0.30, True, "x")
    add("c=16 req/s vs naive FastAPI", _ratio(result, bn, "default/naive", 16), 3.0, True, "x")
    add("c=16 p99", cell(result, bn, 16)["p99_ms"], 6.0, False, " ms")
    add("c=16 server CPU per request", cell(result, bn, 16)["cpu_us"], 120, False, " us")
    add("c=1 p50", cell(result, bn, 1)["p50_ms"], 0.25, False, " ms")
    add("c=1 p99", cell(result, bn, 1)["p99_ms"], 0.5, False, " ms")
    add("cold start to ready (median of 3)", sorted(result["cold_start_seconds"])[1], 1.5, False,
        " s")
    for key, mem in result["memory"].items():
        add(f"RSS growth over {mem['requests']} requests ({key})",
            mem["growth_after_first_chunk_mib"], MEMORY_FLAT_MIB, False, " MiB")
    add("batching, c=1 req/s vs unbatched", _ratio(result, bnb, bn, 1), 0.95, True, "x")
    add("batching, c=64 req/s vs unbatched (default)", _ratio(result, bnb, bn, 64), 1.4, True,
        "x")
    add("batching, c=64 req/s vs unbatched (wide)",
        _ratio(result, "wide/bnserve+batching", "wide/bnserve", 64), 2.0, True, "x")
    out[-1]["bound"] = batching_bound(result, 1.4)
    for model in ("default", "wide"):
        p99 = cell(result, f"{model}/bnserve+batching", 64)["p99_ms"]
        add(f"batching, c=64 p99 vs unbatched ({model})",
            p99 / cell(result, f"{model}/bnserve", 64)["p99_ms"], 2.0, False, "x")
    # Issue 11: the Open Inference Protocol as fast as /predict, and well ahead of KServe's server
    add("V2 JSON, c=16 req/s vs /predict", _ratio(result, V2_JSON, bn, 16), 0.9, True, "x")
    add("V2 binary, c=16 req/s vs /predict", _ratio(result, V2_BINARY, bn, 16), 0.9, True, "x")
    add("V2 JSON, c=16 req/s vs KServe", _ratio(result, V2_JSON, KSERVE, 16), 4.0, True, "x")
    add("V2 JSON, c=16 p99 vs KServe's", cell(result, V2_JSON, 16)["p99_ms"]
        / cell(result, KSERVE, 16)["p99_ms"], 1.0, False, "x", strict=True)
    # Issue 13: drift monitoring on (the default) costs at most 5 % of /predict's req/s, in
    # the A/B of two servers on against two off (benchmarks/drift_ab.py)
    if "drift_ab" in result:
        out += check_drift(result)
    return out


def check_drift(result: dict[str, Any]) -> list[dict[str, Any]]:
    ab = result["drift_ab"]
    return [_target(f"drift monitoring on, c=16 req/s vs off (A/B, median of {ab['rounds']} "
                    "rounds)", ab["ratio"], 0.95, True, "x"),
            _target("drift monitoring A/B, failed requests", ab["errors"], 0, False)]


def batching_bound(result: dict[str, Any], target: float) -> dict[str, float]:
    """How much batching can gain on the default model at c=64, from this run's own figures.

    Batching removes inference cost, nothing else: a request costs ``cpu`` us of server CPU
    unbatched, of which one ONNX Runtime run is ``s1`` us; in a run of 64 rows that share is
    ``s64``. So the gain is at most cpu / (cpu - s1 + s64), and ``target`` needs the rest of a
    request (HTTP, JSON, checks, logs, metrics) to cost at most (s1 - target * s64) /
    (target - 1) us, which is compared with what the bare ASGI app alone costs."""
    floor = result["floor"]["default"]
    s1, s64 = floor["p50_us"], floor["batch64_per_row_us"]
    cpu = cell(result, "default/bnserve", 64)["cpu_us"]
    return {"inference_us": s1, "inference_us_per_row_in_64": s64, "request_cpu_us": cpu,
            "max_gain": cpu / (cpu - s1 + s64),
            "rest_budget_us": (s1 - target * s64) / (target - 1),
            "bare_asgi_cpu_us": cell(result, "default/bare", 64)["cpu_us"]}


def _table(result: dict[str, Any], keys: list[str], ceiling: bool) -> list[str]:
    head = "| server | c | req/s | p50 ms | p99 ms | server CPU us/req | errors |"
    head += " vs ceiling | vs naive |" if ceiling else " vs naive |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    labels = result["labels"]
    for c in (1, 16, 64):
        for key in keys:
            x = cell(result, key, c)
            model = key.split("/")[0]
            row = (f"| {labels[key]} | {c} | {x['rps']:,.0f} | {x['p50_ms']:.3f} | "
                   f"{x['p99_ms']:.3f} | {x['cpu_us']:.0f} | {x['errors']} |")
            if ceiling:
                row += f" {_ratio(result, key, 'default/bare', c):.2f} |"
            row += f" {_ratio(result, key, f'{model}/naive', c):.2f} |"
            lines.append(row)
    return lines


def report(result: dict[str, Any]) -> str:
    m, f = result["machine"], result["floor"]
    keys = [x["key"] for x in result["cells"] if x["concurrency"] == 1]
    default = [k for k in keys if k.startswith("default/")]
    wide = [k for k in keys if k.startswith("wide/")]
    image = [k for k in keys if k.startswith("image/")]
    split = result["image_time_split_us"]
    s = result["settings"]
    lines = [
        f"machine: {m['cpu_model']}, {m['cpus']} CPUs (budget {m['cpu_budget']}), Python "
        f"{m['python']}; load generator {result['wrk']} with 1 thread on the same machine",
        f"{s['rounds']} rounds x {s['seconds']:g} s per cell (after {s['warmup']:g} s warm-up); "
        "figures are medians over rounds; bnserve with its default JSON access log on",
        "",
        "floor, ONNX Runtime run() of one example in-process: "
        + "; ".join(f"{k} model p50 {v['p50_us']:.1f} us, p99 {v['p99_us']:.1f} us"
                    for k, v in f.items()),
        "",
        "Default model (30 inputs, hidden 32, 16), one worker unless stated:",
        "",
        *_table(result, default, ceiling=True),
        "",
        *_v2_lines(result),
        "",
        "Wide model (256 inputs, hidden 1024 x 4), one worker:",
        "",
        *_table(result, wide, ceiling=False),
        "",
        "Image model (3x32x32 input: a small ResNet exported by PyTorch, its 9 batch norms folded "
        "by bnserve-export --from-onnx), one worker:",
        "",
        *_table(result, image, ceiling=False),
        "",
        f"image model, one POST /predict in-process ({split['body_bytes']:,} bytes of JSON, "
        f"{split['numbers']:,} numbers): JSON parsing {split['json_parse_us']:.0f} us, checks "
        f"and float32 conversion {split['decode_us']:.0f} us, ONNX Runtime "
        f"{split['inference_us']:.0f} us, the answer {split['answer_us']:.0f} us",
        "",
        "start and memory:",
    ]
    for key, srv in result["servers"].items():
        rss = ", ".join(f"{r:.0f}" for r in srv["rss_ready_mib"])
        lines.append(f"  {key}: ready {srv['ready_seconds']:.2f} s after start, RSS per worker "
                     f"{rss} MiB")
    lines.append("  bnserve cold starts (process start to /readyz 200): "
                 + ", ".join(f"{t:.2f} s" for t in result["cold_start_seconds"]))
    for key, mem in result["memory"].items():
        first, last = mem["chunks"][0], mem["chunks"][-1]
        lines.append(
            f"  {key}: RSS {mem['rss_ready_mib'][0]:.1f} MiB before, {first['rss_mib'][0]:.1f} "
            f"after {first['requests']} requests, {last['rss_mib'][0]:.1f} after "
            f"{last['requests']} (errors {sum(c['errors'] for c in mem['chunks'])})")
    lines += ["", "noise control, identical servers (req/s ratio per round: median, range):"]
    for c in (1, 16, 64):
        r = _ratios(result, "default/bnserve-control", "default/bnserve", c)
        lines.append(f"  c={c}: {statistics.median(r):.3f} ({min(r):.3f} to {max(r):.3f})")
    if "drift_ab" in result:
        lines += drift_lines(result["drift_ab"])
    bare = cell(result, "default/bare", 1)
    lines.append(f"  the stack alone (bare ASGI) at c=1: p50 {bare['p50_ms']:.3f} ms, "
                 f"p99 {bare['p99_ms']:.3f} ms")
    lines += ["", "targets (ratios are medians of per-round paired ratios):"]
    lines += [target_line(t) for t in result["targets"]]
    b = next(t["bound"] for t in result["targets"] if "bound" in t)
    lines += [
        "",
        f"batching bound, default model, c=64: one inference is {b['inference_us']:.1f} us of "
        f"the {b['request_cpu_us']:.0f} us of server CPU a request costs unbatched "
        f"({b['inference_us_per_row_in_64']:.2f} us per row in a run of 64), so batching can "
        f"gain at most {b['max_gain']:.2f}x; 1.4x would need the rest of a request to cost at "
        f"most {b['rest_budget_us']:.1f} us, and the bare ASGI app alone costs "
        f"{b['bare_asgi_cpu_us']:.0f} us",
    ]
    return "\n".join(lines)


def _v2_lines(result: dict[str, Any]) -> list[str]:
    """The Open Inference Protocol against /predict (the same server process) and KServe."""
    k = result["kserve"]
    v = k["versions"]
    lines = [f"Open Inference Protocol (V2), default model, against bnserve's /predict and KServe "
             f"{v['kserve']}'s Python server (fastapi {v['fastapi']}, uvicorn {v['uvicorn']}, "
             f"pydantic {v['pydantic']}, onnxruntime {v['onnxruntime']}; in {k['venv']}):"]
    for c in (1, 16, 64):
        j, ks = cell(result, V2_JSON, c), cell(result, KSERVE, c)
        lines.append(
            f"  c={c}: req/s vs /predict: JSON {_ratio(result, V2_JSON, 'default/bnserve', c):.2f}"
            f", binary {_ratio(result, V2_BINARY, 'default/bnserve', c):.2f}; JSON vs KServe "
            f"{_ratio(result, V2_JSON, KSERVE, c):.2f}x, p99 {j['p99_ms']:.3f} ms against "
            f"{ks['p99_ms']:.3f} ms")
    return lines


def drift_lines(ab: dict[str, Any]) -> list[str]:
    """The drift monitoring A/B (two servers on, two off, back to back) and the in-process cost."""
    r, cpu, inp = ab["ratios"], ab["cpu_us"], ab["inprocess"]
    return [
        f"  drift monitoring, 2 servers on vs 2 off (fresh processes every round), c=16, "
        f"{ab['rounds']} rounds: req/s ratio "
        f"{statistics.median(r):.3f} ({min(r):.3f} to {max(r):.3f}); server CPU us/req on "
        f"{cpu['on1']:.0f}, {cpu['on2']:.0f}, off {cpu['off1']:.0f}, {cpu['off2']:.0f}",
        f"  drift monitoring in-process: a run {inp['run_us']:.1f} us, a watched run with its "
        f"buffering {inp['watched_run_us']:.1f} us, so {inp['extra_per_watched_run_us']:.1f} us "
        f"more, one run in {inp['sample_every']}: {inp['extra_per_request_us']:.2f} us per "
        "request",
    ]


def target_line(t: dict[str, Any]) -> str:
    return (f"  [{'met' if t['met'] else 'NOT MET'}] {t['target']}: {t['measured']:g}{t['unit']} "
            f"(target {t['limit']})")
