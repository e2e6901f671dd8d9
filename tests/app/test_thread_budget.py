"""ONNX Runtime threads times workers stay within the CPUs the process may use (affinity and
cgroup quota), whenever there are at least as many CPUs as workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cpus import cpu_budget
from app.settings import Settings


@pytest.mark.parametrize("cpu_max", ["max 100000", "100000 100000", "150000 100000",
                                     "250000 100000", "800000 100000"])
@pytest.mark.parametrize("affinity", [1, 2, 3, 4, 16])
def test_intra_op_threads_times_workers_never_exceed_the_cpu_budget(
    tmp_path: Path, cpu_max: str, affinity: int
) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    budget = cpu_budget(tmp_path, affinity=affinity)
    assert 1 <= budget.cpus <= affinity
    for workers in range(1, budget.cpus + 1):
        intra, inter = Settings(workers=workers).threads(budget)
        assert intra >= 1
        assert intra * workers <= budget.cpus
        assert inter == 1  # sequential execution: inter-op threads would only sit idle
    # more workers than CPUs: one thread each, the least there is (and a warning at start)
    assert Settings(workers=budget.cpus + 1).threads(budget)[0] == 1
