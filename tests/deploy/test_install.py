"""The install path: lock files that agree with pyproject.toml, and the Makefile that uses them.

The lock files in requirements/ are what `make`, CI and the Dockerfile install (hash-checked).
These tests check them offline against pyproject.toml, and check the Makefile's stamps, model
rules and variables with `make -n` (and one real, install-free run) in a scratch copy.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
REQ = REPO / "requirements"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Each lock file and the pyproject.toml lists it holds, in order: each holds the one before it.
LOCKS = {
    "runtime.txt": ["dependencies"],
    "serve.txt": ["dependencies", "export"],
    "loadtest.txt": ["dependencies", "export", "loadtest"],
    "dev.txt": ["dependencies", "dev"],
}


class Pin:
    def __init__(self, line: str) -> None:
        spec, *hashes = (part.strip() for part in line.split("--hash="))
        self.req = Requirement(spec)
        self.hashes = hashes
        self.name = canonicalize_name(self.req.name)
        specs = list(self.req.specifier)
        assert [s.operator for s in specs] == ["=="], f"not pinned with ==: {line}"
        self.version = specs[0].version


def read_lock(path: Path) -> dict[str, Pin]:
    """The pins of a lock file: continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [re.sub(r"(^|\s)#.*", "", line).strip() for line in text.splitlines()]
    pins = [Pin(line) for line in lines if line and not line.startswith("-")]
    return {p.name: p for p in pins}


def declared(lists: list[str]) -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = []
    for key in lists:
        items = project["dependencies"] if key == "dependencies" else (
            project["optional-dependencies"][key])
        reqs += [Requirement(r) for r in items]
    return [*reqs, *(Requirement(r) for r in PYPROJECT["build-system"]["requires"]),
            Requirement("pip")]


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_file_pins_every_declared_requirement_with_hashes(lock: str) -> None:
    pins = read_lock(REQ / lock)
    assert pins, f"requirements/{lock} is empty"
    unhashed = sorted(name for name, p in pins.items() if not p.hashes)
    assert not unhashed, f"requirements/{lock}: no --hash for {unhashed}"
    stale = []
    for req in declared(LOCKS[lock]):
        pin = pins.get(canonicalize_name(req.name))
        if pin is None or not req.specifier.contains(pin.version, prereleases=True):
            stale.append(f"{req} (locked: {pin.version if pin else 'missing'})")
    assert not stale, (
        f"requirements/{lock} does not satisfy pyproject.toml: {stale}; run `make lock`"
    )


def test_each_lock_file_holds_the_one_before_it_at_the_same_versions() -> None:
    order = ["runtime.txt", "serve.txt", "loadtest.txt", "dev.txt"]
    for small, big in itertools.pairwise(order):
        a, b = read_lock(REQ / small), read_lock(REQ / big)
        differ = {n: (p.version, b[n].version if n in b else None)
                  for n, p in a.items() if n not in b or b[n].version != p.version}
        assert not differ, f"requirements/{small} vs {big}: {differ}; run `make lock`"
    serve, dev = read_lock(REQ / "serve.txt"), read_lock(REQ / "dev.txt")
    assert "onnx" in serve
    assert not {"locust", "mypy", "pytest"} & set(serve)
    assert {"mypy", "ruff", "pytest", "locust", "types-pyyaml", "types-jsonschema"} <= set(dev)


def test_build_requirements_match_pyproject_and_the_lock_tool_is_pinned() -> None:
    build_in = [
        Requirement(line) for line in (REQ / "build.in").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sorted(map(str, build_in)) == sorted(
        [*(str(Requirement(r)) for r in PYPROJECT["build-system"]["requires"]), "pip"]
    ), "requirements/build.in lists pyproject.toml's [build-system] requires, and pip"
    uv_in = (REQ / "uv.in").read_text()
    wanted = re.search(r"^uv==(\S+)", uv_in, re.M)
    assert wanted, "requirements/uv.in pins uv"
    uv = read_lock(REQ / "uv.txt")["uv"]
    assert uv.version == wanted[1]
    assert uv.hashes


def test_dockerfile_installs_only_from_the_lock_files() -> None:
    dockerfile = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    installs = [c for c in re.split(r"&&|\n", dockerfile) if "pip install" in c]
    assert installs
    for cmd in installs:
        locked = re.search(r"--require-hashes -r requirements/(\w+)\.txt", cmd)
        itself = re.search(r"--no-deps --no-build-isolation \.\s*$", cmd)
        assert locked or itself, f"Dockerfile installs something unlocked: {cmd.strip()}"
        if locked:
            assert f"COPY requirements/{locked[1]}.txt" in dockerfile
    assert "!requirements/*.txt" in (REPO / ".dockerignore").read_text()


# --- the Makefile, in a scratch copy ------------------------------------------------------------

MAKE = shutil.which("make")


class Scratch:
    """A copy of the Makefile beside empty lock files; files are made with increasing mtimes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.clock = time.time() - 1000
        shutil.copy(REPO / "Makefile", root / "Makefile")
        locks = [f"requirements/{n}" for n in [*LOCKS, "uv.txt"]]
        self.touch("pyproject.toml", *locks)

    def touch(self, *names: str) -> None:
        for name in names:
            path = self.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            self.clock += 10
            os.utime(path, (self.clock, self.clock))

    def installed(self, *stamps: str) -> None:
        self.touch(".venv/bin/python", ".venv/bin/uv", *(f".venv/.{s}-stamp" for s in stamps))

    def make(self, *args: str, env: dict[str, str] | None = None, dry: bool = True
             ) -> subprocess.CompletedProcess[str]:
        assert MAKE is not None, "make is not installed: the README's set-up needs it"
        base = {k: v for k, v in os.environ.items()
                if k not in {"BNSERVE_MODEL_PATH", "MODEL", "CHECKPOINT", "MAKEFLAGS"}}
        return subprocess.run(
            [MAKE, "--no-print-directory", *(["-n"] if dry else []), *args], cwd=self.root,
            env={**base, **(env or {})}, capture_output=True, text=True, check=False,
        )

    def plan(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = self.make(*args, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout


def installs(plan: str) -> list[str]:
    """The lock files installed with uv, in order."""
    return re.findall(r"uv pip install .*--require-hashes -r requirements/(\w+)\.txt", plan)


@pytest.fixture
def scratch(tmp_path: Path) -> Scratch:
    return Scratch(tmp_path)


def test_fresh_serve_installs_the_serve_lock_only_then_trains_exports_and_serves(
    scratch: Scratch,
) -> None:
    plan = scratch.plan("serve")
    assert "-m venv --without-pip .venv" in plan
    uv = "-m pip --python .venv/bin/python install --require-hashes -r requirements/uv.txt"
    assert uv in plan
    assert installs(plan) == ["serve"]
    assert "-e ." in plan
    assert ".venv/bin/bnserve-train --out models/default.ckpt" in plan
    export = ".venv/bin/bnserve-export --checkpoint models/default.ckpt --out models/default.onnx"
    assert export in plan
    assert plan.rstrip().endswith("BNSERVE_MODEL_PATH=models/default.onnx .venv/bin/bnserve-serve")


def test_fresh_test_installs_the_dev_lock_and_runs_everything(scratch: Scratch) -> None:
    plan = scratch.plan("test")
    assert installs(plan) == ["dev"]
    assert ".venv/bin/ruff check ." in plan
    assert ".venv/bin/mypy" in plan
    assert plan.rstrip().endswith(".venv/bin/pytest -q")
    fast = scratch.plan("test-fast")
    assert fast.rstrip().endswith('.venv/bin/pytest -q -m "not slow"')


def test_test_then_serve_installs_nothing_more(scratch: Scratch) -> None:
    scratch.installed("serve", "loadtest", "dev")  # what the dev install leaves
    scratch.touch("models/default.onnx")
    assert installs(scratch.plan("serve")) == []
    assert installs(scratch.plan("loadtest")) == []
    assert installs(scratch.plan("test")) == []


def test_serve_then_test_adds_the_dev_tools(scratch: Scratch) -> None:
    scratch.installed("serve")
    assert installs(scratch.plan("serve")) == []
    assert installs(scratch.plan("test")) == ["dev"]
    assert installs(scratch.plan("loadtest")) == ["loadtest"]


def test_a_new_lock_file_reinstalls(scratch: Scratch) -> None:
    scratch.installed("serve", "loadtest", "dev")
    scratch.touch("requirements/serve.txt", "requirements/dev.txt")
    assert installs(scratch.plan("serve")) == ["serve"]
    assert installs(scratch.plan("test")) == ["dev"]


def test_model_precedence_command_line_then_environment_then_default(scratch: Scratch) -> None:
    scratch.installed("serve")
    scratch.touch("models/default.onnx", "models/cli.onnx", "models/env.onnx")
    served = "BNSERVE_MODEL_PATH={} .venv/bin/bnserve-serve"
    assert served.format("models/default.onnx") in scratch.plan("serve")
    assert served.format("models/cli.onnx") in scratch.plan("serve", "MODEL=models/cli.onnx")
    env = {"BNSERVE_MODEL_PATH": "models/env.onnx"}
    assert served.format("models/env.onnx") in scratch.plan("serve", env=env)
    assert served.format("models/cli.onnx") in scratch.plan("serve", "MODEL=models/cli.onnx",
                                                            env=env)
    # a stray MODEL in the environment is not the make variable
    assert served.format("models/default.onnx") in scratch.plan("serve", env={"MODEL": "x.onnx"})


def test_an_existing_model_is_served_as_it_is_and_re_exported_after_its_checkpoint(
    scratch: Scratch,
) -> None:
    scratch.installed("serve")
    scratch.touch("models/sensor.onnx")  # imported with --from-onnx: no checkpoint
    plan = scratch.plan("serve", "MODEL=models/sensor.onnx")
    assert "bnserve-export" not in plan
    assert "bnserve-train --out" not in plan
    scratch.touch("models/my.onnx", "models/my.ckpt")  # retrained after its export
    plan = scratch.plan("serve", env={"BNSERVE_MODEL_PATH": "models/my.onnx"})
    assert ".venv/bin/bnserve-export --checkpoint models/my.ckpt --out models/my.onnx" in plan
    assert "bnserve-train --out" not in plan
    plan = scratch.plan("model", "MODEL=models/other.onnx", "CHECKPOINT=models/my.ckpt")
    assert ".venv/bin/bnserve-export --checkpoint models/my.ckpt --out models/other.onnx" in plan


def test_a_missing_non_default_model_without_checkpoint_fails_and_says_what_to_do(
    scratch: Scratch,
) -> None:
    scratch.installed("serve")  # so this real run installs nothing
    done = scratch.make("serve", "MODEL=models/my.onnx", dry=False)
    assert done.returncode != 0
    assert "models/my.onnx does not exist, and there is no checkpoint models/my.ckpt" in done.stderr
    assert "bnserve-train --data my.csv --target label --out models/my.ckpt" in done.stderr
    assert "bnserve-serve" not in done.stdout


def test_loadtest_takes_the_checkpoint(scratch: Scratch) -> None:
    scratch.installed("serve", "loadtest", "dev")
    plan = scratch.plan("loadtest")
    assert "--checkpoint models/default.ckpt" in plan
    plan = scratch.plan("loadtest", "CHECKPOINT=models/my.ckpt", "LOADTEST_TIME=5s")
    assert "--checkpoint models/my.ckpt" in plan
    assert "--run-time 5s" in plan
    plan = scratch.plan("loadtest", env={"BNSERVE_MODEL_PATH": "models/my.onnx"})
    assert "--checkpoint models/my.ckpt" in plan
