"""``make loadtest``: run locust headless against a running bnserve, bounded in time.

Writes the request rows (the checkpoint's validation set, with the numpy reference's class for
each), runs ``benchmarks/locustfile.py``, writes CSV and HTML reports, prints requests/s and
p50/p95/p99, and exits non-zero when any request failed or p99 is over ``--p99-ms``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERDICT = "loadtest verdict: "  # the line benchmarks/locustfile.py prints when locust quits


def write_requests(checkpoint_path: Path, out: Path) -> None:
    # The checkpoint is the model's source: its validation rows and what numpy predicts for them.
    from model_export import checkpoint, export, mlp  # noqa: PLC0415 - heavy, only needed here

    net, meta, x, _ = checkpoint.load(checkpoint_path)
    classes = meta["class_names"]
    expected = mlp.forward_infer(net, x.astype("float32").astype("float64")).argmax(axis=1)
    spec = {
        "model_version": export.default_version(net),
        "feature_names": meta["feature_names"],
        "class_names": classes,
        "rows": x.tolist(),
        "expected_classes": [classes[i] for i in expected],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(spec))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtest", description=__doc__)
    p.add_argument("--host", default="http://127.0.0.1:8000")
    p.add_argument("--run-time", default="30s", help="locust --run-time, e.g. 30s or 2m")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--spawn-rate", type=float, default=16.0)
    p.add_argument("--p99-ms", type=float, default=50.0, help="fail when p99 is over this")
    p.add_argument("--checkpoint", type=Path, default=Path("models/default.ckpt"))
    p.add_argument("--reports", type=Path, default=Path("reports"))
    args = p.parse_args(argv)

    requests = args.reports / "loadtest-requests.json"
    write_requests(args.checkpoint, requests)
    prefix = args.reports / "locust"
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(HERE / "locustfile.py"),
        "--headless",
        "--host",
        args.host,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.run_time,
        "--stop-timeout",
        "10",
        "--csv",
        str(prefix),
        "--html",
        str(prefix) + ".html",
        "--only-summary",
        "--loglevel",
        "WARNING",
    ]
    summary = args.reports / "loadtest-summary.json"
    summary.unlink(missing_ok=True)
    env = {
        **os.environ,
        "BNSERVE_LOADTEST_REQUESTS": str(requests),
        "BNSERVE_LOADTEST_P99_MS": str(args.p99_ms),
        "BNSERVE_LOADTEST_SUMMARY": str(summary),
    }
    rc, verdict = _run_locust(cmd, env)
    if not summary.is_file():
        for line in verdict:
            print(line)
        print(f"loadtest: locust exited {rc} without a summary", file=sys.stderr)
        return rc or 1
    s = json.loads(summary.read_text())
    print(
        f"loadtest: {s['requests']:.0f} requests, {s['failures']:.0f} failed, "
        f"{s['rps']:.0f} req/s, p50 {s['p50_ms']:g} ms, p95 {s['p95_ms']:g} ms, "
        f"p99 {s['p99_ms']:g} ms (limit {args.p99_ms:g} ms); reports in {args.reports}/"
    )
    for line in verdict:  # last, after locust's table (on stderr) and the figures above
        print(line, flush=True)
    return rc


def _run_locust(cmd: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Runs locust, passing its output through as it comes except the verdict line, which the
    locustfile prints as locust quits, before locust prints its summary table: it is returned,
    to be printed at the end."""
    verdict: list[str] = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(VERDICT):
                verdict.append(line.rstrip("\n"))
            else:
                sys.stdout.write(line)
                sys.stdout.flush()
    return proc.returncode, verdict


if __name__ == "__main__":
    sys.exit(main())
