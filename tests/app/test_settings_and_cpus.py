"""Settings from the environment, and the CPU budget that sizes ONNX Runtime's thread pools."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.cli import main
from app.cpus import cgroup_quota, cpu_budget
from app.settings import Settings


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    return tmp_path


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000"}, None),
        ({"cpu.max": "150000 100000"}, 1.5),
        ({"cpu.max": "400000 100000"}, 4.0),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({"cpu/cpu.cfs_quota_us": "250000", "cpu/cpu.cfs_period_us": "100000"}, 2.5),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
         0.5),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
    ids=["v2 unlimited", "v2 1.5", "v2 4", "v1 unlimited", "v1 2.5", "v1 cpuacct 0.5",
         "unreadable", "no cgroup files"],
)
def test_cgroup_quota_is_read_from_v2_or_v1_files(
    tmp_path: Path, files: dict[str, str], quota: float | None
) -> None:
    assert cgroup_quota(_cgroup(tmp_path, files)) == quota


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "cpus"),
    [(8, "max 100000", 8), (8, "200000 100000", 2), (8, "150000 100000", 1),
     (8, "50000 100000", 1), (2, "400000 100000", 2)],
)
def test_cpu_budget_is_the_smaller_of_affinity_and_whole_quota_cpus(
    tmp_path: Path, affinity: int, cpu_max: str, cpus: int
) -> None:
    budget = cpu_budget(_cgroup(tmp_path, {"cpu.max": cpu_max}), affinity=affinity)
    assert budget.cpus == cpus
    assert str(cpus) in budget.describe()


def test_threads_default_to_the_budget_divided_by_workers(tmp_path: Path) -> None:
    budget = cpu_budget(_cgroup(tmp_path, {"cpu.max": "400000 100000"}), affinity=16)
    assert Settings(workers=1).threads(budget) == (4, 1)
    assert Settings(workers=2).threads(budget) == (2, 1)
    assert Settings(workers=3).threads(budget) == (1, 1)
    assert Settings(workers=8).threads(budget) == (1, 1)  # never 0
    assert Settings(workers=2, intra_op_threads=3, inter_op_threads=2).threads(budget) == (3, 2)


def test_settings_come_from_bnserve_environment_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BNSERVE_MODEL_PATH", str(tmp_path / "m.onnx"))
    monkeypatch.setenv("BNSERVE_PORT", "9001")
    monkeypatch.setenv("BNSERVE_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("BNSERVE_DOCS_ENABLED", "false")
    monkeypatch.setenv("BNSERVE_INTRA_OP_THREADS", "")  # empty = unset = auto
    s = Settings()
    assert (s.model_path, s.port, s.log_level) == (tmp_path / "m.onnx", 9001, "warning")
    assert s.docs_enabled is False
    assert s.intra_op_threads is None
    assert Settings.model_fields.keys() >= {
        "model_path", "host", "port", "workers", "intra_op_threads", "inter_op_threads",
        "max_body_bytes", "max_batch", "log_level", "log_format", "docs_enabled", "fail_fast",
        "shutdown_grace_seconds", "shutdown_delay_seconds", "metrics_dir"}
    assert all(f.description for f in Settings.model_fields.values())


@pytest.mark.parametrize(
    ("var", "value"),
    [("BNSERVE_PORT", "http"), ("BNSERVE_PORT", "70000"), ("BNSERVE_WORKERS", "0"),
     ("BNSERVE_LOG_FORMAT", "xml"), ("BNSERVE_MAX_BATCH", "0")],
)
def test_invalid_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError):
        Settings()
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err
    assert var.removeprefix("BNSERVE_").lower() in err
