"""Locust for real: a few seconds of headless load against a real server, every answer checked."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from model_export import checkpoint

REPO = Path(__file__).resolve().parents[2]
ModelFiles = Any  # tests/deploy/conftest.py's ModelFiles (conftest modules are not importable)


def _loadtest(
    url: str, model: ModelFiles, reports: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "loadtest.py"),
        "--host",
        url,
        "--checkpoint",
        str(model.checkpoint),
        "--reports",
        str(reports),
        "--users",
        "4",
        "--spawn-rate",
        "4",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_locust_runs_against_a_real_server_with_zero_failures(
    server: str, model_files: ModelFiles, tmp_path: Path
) -> None:
    run = _loadtest(server, model_files, tmp_path, "--run-time", "4s", "--p99-ms", "1000")
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "loadtest-summary.json").read_text())
    assert summary["failures"] == 0
    assert summary["requests"] > 100
    assert run.stdout.rstrip().splitlines()[-1] == "loadtest verdict: pass"  # after the figures
    assert "Response time percentiles" in run.stderr  # locust's table (printed before them)
    assert (tmp_path / "locust.html").stat().st_size > 0
    assert (tmp_path / "locust_stats.csv").read_text().count("/predict") >= 3
    spec = json.loads((tmp_path / "loadtest-requests.json").read_text())
    assert len(spec["rows"]) == 113  # the validation rows


@pytest.mark.slow
def test_loadtest_fails_when_p99_is_over_the_limit(
    server: str, model_files: ModelFiles, tmp_path: Path
) -> None:
    run = _loadtest(server, model_files, tmp_path, "--run-time", "2s", "--p99-ms", "0.001")
    assert run.returncode == 1
    assert "is over the limit of 0.001 ms" in run.stdout


@pytest.mark.slow
def test_loadtest_fails_when_answers_are_wrong(
    server: str, model_files: ModelFiles, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Content checks bite: against a server whose model differs from the rows' reference only in
    its version, the run still passes; with the reference classes flipped, it fails."""
    net, meta, vx, vy = checkpoint.load(model_files.checkpoint)
    meta["class_names"] = list(reversed(meta["class_names"]))  # same model, names swapped
    swapped = tmp_path_factory.mktemp("swapped") / "m.ckpt"
    checkpoint.save(swapped, net, meta, vx, vy)
    run = _loadtest(
        server,
        type(model_files)(swapped, model_files.onnx),
        tmp_path,
        "--run-time",
        "2s",
        "--p99-ms",
        "1000",
    )
    assert run.returncode == 1
    assert "requests failed" in run.stdout


def test_the_verdict_is_held_back_until_the_end(capsys: pytest.CaptureFixture[str]) -> None:
    """The locustfile prints its verdict as locust quits, before locust's summary table: the
    wrapper passes every other line through as it comes and returns the verdict for the end."""
    spec = importlib.util.spec_from_file_location("loadtest", REPO / "benchmarks" / "loadtest.py")
    assert spec is not None
    assert spec.loader is not None
    loadtest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loadtest)
    script = "print('before'); print('loadtest verdict: pass', flush=True); print('after')"
    rc, verdict = loadtest._run_locust([sys.executable, "-c", script], {})
    assert (rc, verdict) == (0, ["loadtest verdict: pass"])
    assert capsys.readouterr().out == "before\nafter\n"
