"""KServe's Python model server, in a virtual environment of its own, made on first use.

KServe pins its own FastAPI, uvicorn, pydantic and gRPC: installed into bnserve's .venv they
would change the stack that bnserve and every other server here run on. So the benchmark makes
``reports/.kserve-venv`` (ignored by git, removed by ``make clean``) with ``python -m venv`` and
pip from the package registry, once: 75 s on the 2-core benchmark machine, most of it
downloading 46 packages. It reuses it for as long as it was made with the pins below, the
versions the KServe server (benchmarks/servers/kserve_onnx.py) was tested with: KServe, the same
ONNX Runtime as bnserve, and the web stack that decides KServe's speed. Its other dependencies
are whatever pip resolves for them.

    python benchmarks/kserve_env.py    # make it (if needed) and print its versions
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "reports" / ".kserve-venv"
PINS = (
    "kserve==0.21.0",
    "onnxruntime==1.31.1",
    "numpy==2.4.6",
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "pydantic==2.14.3",
    "uvicorn==0.54.0",
    "uvloop==0.23.0",
    "httptools==0.9.0",
    "orjson==3.13.0",
)
REPORTED = tuple(pin.split("==")[0] for pin in PINS)
_STAMP = ".bnserve-pins"  # the pins it was made with


def ensure(venv: Path = VENV) -> tuple[Path, float | None]:
    """The venv's python, and how many seconds making it took (None when it already existed)."""
    python = venv / "bin" / "python"
    stamp = venv / _STAMP
    want = "\n".join(PINS) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python, None
    print(f"KServe: making {venv} (pip install {' '.join(PINS)})", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    *PINS], check=True, timeout=1800)
    stamp.write_text(want)
    seconds = time.perf_counter() - t0
    print(f"KServe: {venv} made in {seconds:.0f} s", flush=True)
    return python, seconds


def versions(python: Path) -> dict[str, str]:
    """Python's and the reported packages' versions, as installed in that venv."""
    code = ("import importlib.metadata as m, json, platform; "
            f"print(json.dumps({{'python': platform.python_version()}} | "
            f"{{n: m.version(n) for n in {list(REPORTED)!r}}}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    found: dict[str, str] = json.loads(out)
    return found


if __name__ == "__main__":
    print(json.dumps(versions(ensure()[0]), indent=2))
