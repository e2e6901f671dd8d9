"""README.md's default model is the one a fresh clone builds.

Builds the default model exactly as ``make model`` does (``bnserve-train --out`` then
``bnserve-export --checkpoint --out``, default arguments otherwise, with this environment's
locked versions) and compares its size, sha256 and model version with what README.md states.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# bnserve-export's last line, as README.md quotes it for the default model.
WRITTEN = re.compile(
    r"model written: models/default\.onnx\s+\((\d+) bytes, sha256 ([0-9a-f]{64})\)"
)
VERSION = re.compile(r"sha-[0-9a-f]{12}")
# Lines quoting the default model's answers: /readyz, a prediction of the shipped data's classes,
# the V2 metadata and inference answers (model name "default").
DEFAULT_MODEL_LINE = re.compile(
    r'"ready":\s*true|"benign"|"name":\s*"default"|"model_name":\s*"default"'
)


@dataclass(frozen=True)
class Built:
    size: int
    sha256: str
    version: str


def stated_files(text: str) -> list[tuple[int, int, str]]:
    """(line number, size, sha256) of every ``model written: models/default.onnx`` line."""
    return [
        (n, int(m[1]), m[2])
        for n, line in enumerate(text.splitlines(), 1)
        if (m := WRITTEN.search(line)) is not None
    ]


def stated_versions(text: str) -> list[tuple[int, str]]:
    """(line number, version) of every model version on a line quoting the default model."""
    return [
        (n, v)
        for n, line in enumerate(text.splitlines(), 1)
        if DEFAULT_MODEL_LINE.search(line)
        for v in VERSION.findall(line)
    ]


def mismatches(text: str, built: Built) -> list[str]:
    problems = []
    files = stated_files(text)
    if not files:
        problems.append(
            "README.md has no 'model written: models/default.onnx  (N bytes, sha256 ...)' line "
            "(the bnserve-export example): add one"
        )
    for n, size, sha in files:
        if (size, sha) != (built.size, built.sha256):
            problems.append(
                f"README.md line {n} states {size} bytes, sha256 {sha}; update it to "
                f"{built.size} bytes, sha256 {built.sha256}"
            )
    versions = stated_versions(text)
    if not versions:
        problems.append(
            "README.md quotes no model version of the default model (the /readyz answer)"
        )
    problems += [
        f"README.md line {n} states model version {v}; update it to {built.version}"
        for n, v in versions
        if v != built.version
    ]
    return problems


def _run(tool: str, *args: str, cwd: Path) -> str:
    exe = Path(sys.executable).parent / tool
    assert exe.exists(), f"{exe} is not installed: run `make test`"
    done = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{tool} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def build_default_model(work: Path) -> Built:
    """What `make model` runs, into ``work`` instead of models/."""
    _run("bnserve-train", "--out", str(work / "models/default.ckpt"), cwd=work)
    _run(
        "bnserve-export",
        "--checkpoint", str(work / "models/default.ckpt"),
        "--out", str(work / "models/default.onnx"),
        cwd=work,
    )
    data = (work / "models/default.onnx").read_bytes()
    props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    return Built(len(data), hashlib.sha256(data).hexdigest(), props["model_version"])


@pytest.mark.slow
def test_readme_states_the_model_a_fresh_make_model_builds(tmp_path: Path) -> None:
    built = build_default_model(tmp_path)
    problems = mismatches(README.read_text(encoding="utf-8"), built)
    assert not problems, (
        "README.md does not state the model a fresh `make model` builds "
        f"({built.version}, {built.size} bytes, sha256 {built.sha256}):\n  "
        + "\n  ".join(problems)
    )


def test_the_check_finds_a_stale_readme_line() -> None:
    # A control: the comparison itself names the line to update.
    text = (
        "intro\n"
        "model written: models/default.onnx  (8122 bytes, sha256 " + "a" * 64 + ")\n"
        '{"ready":true,"reason":"ready","model_version":"sha-000000000000"}\n'
        '{"class":"run","model_version":"sha-6bf0433aff6e"}\n'  # another model: not checked
    )
    built = Built(8122, "b" * 64, "sha-b2e74bd27c91")
    assert mismatches(text, built) == [
        f"README.md line 2 states 8122 bytes, sha256 {'a' * 64}; update it to 8122 bytes, "
        f"sha256 {'b' * 64}",
        "README.md line 3 states model version sha-000000000000; update it to sha-b2e74bd27c91",
    ]
    good = text.replace("a" * 64, "b" * 64).replace("sha-000000000000", "sha-b2e74bd27c91")
    assert mismatches(good, built) == []
    assert len(mismatches("nothing stated\n", built)) == 2


def test_readme_states_the_default_model() -> None:
    text = README.read_text(encoding="utf-8")
    assert stated_files(text), "README.md: no 'model written: models/default.onnx' line"
    assert stated_versions(text), "README.md: no model version of the default model"
