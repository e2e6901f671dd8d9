"""How many CPUs this process may really use, so ONNX Runtime threads do not oversubscribe them.

``os.cpu_count()`` reports the host's CPUs; a container is usually limited by a CFS quota
(Kubernetes ``resources.limits.cpu``) and/or a CPU affinity mask. Running more busy threads than
the quota allows gets the whole process throttled, so the budget is the smaller of the two,
with a fractional quota rounded down (1.5 CPUs cannot keep 2 threads busy without throttling).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    cpus: int  # what threads may use: min(affinity, floor(quota)), at least 1
    affinity: int
    quota: float | None  # CPUs granted by the cgroup quota; None when unlimited or unknown

    def describe(self) -> str:
        quota = "none" if self.quota is None else f"{self.quota:g} CPUs"
        return f"{self.cpus} (affinity {self.affinity} CPUs, cgroup quota {quota})"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs granted by the CFS quota (cgroup v2 ``cpu.max``, else v1), None if unlimited."""
    v2 = _read(root / "cpu.max")  # "max 100000" or "150000 100000"
    if v2 is not None:
        parts = v2.split()
        if len(parts) == 2 and parts[0] != "max":
            try:
                quota, period = int(parts[0]), int(parts[1])
            except ValueError:
                return None
            return quota / period if quota > 0 and period > 0 else None
        return None
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        quota_s, period_s = _read(v1 / "cpu.cfs_quota_us"), _read(v1 / "cpu.cfs_period_us")
        if quota_s is None or period_s is None:
            continue
        try:
            quota, period = int(quota_s), int(period_s)
        except ValueError:
            return None
        return quota / period if quota > 0 and period > 0 else None  # -1 means unlimited
    return None


def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_budget(root: Path = CGROUP_ROOT, affinity: int | None = None) -> CpuBudget:
    aff = affinity if affinity is not None else affinity_cpus()
    quota = cgroup_quota(root)
    cpus = aff if quota is None else min(aff, math.floor(quota))
    return CpuBudget(cpus=max(1, cpus), affinity=aff, quota=quota)
