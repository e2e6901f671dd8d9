# syntax=docker/dockerfile:1
# bnserve: serves the default model out of the box; mount another over BNSERVE_MODEL_PATH.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Runtime dependencies only, from the lock file (exact versions, hash-checked, the same as `make`
# installs): this layer is rebuilt only when they change. It also holds setuptools and wheel, the
# build backend that installs bnserve itself below; the final image drops them with pip.
FROM base AS deps
WORKDIR /build
COPY requirements/runtime.txt ./requirements/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --require-hashes -r requirements/runtime.txt

# The package itself, installed into the same virtual environment. pip leaves compiled bytecode:
# the runtime user cannot write it (read-only root), and without it every start recompiles.
FROM deps AS build
COPY pyproject.toml README.md ./
COPY app ./app
COPY model_export ./model_export
RUN /opt/venv/bin/python -m pip install --no-deps --no-build-isolation .

# Train and export the default model with `make serve`'s locked versions (serve.txt adds onnx,
# which export needs and the final image does not), so the image serves the file README.md names.
FROM build AS model
COPY requirements/serve.txt ./requirements/
RUN /opt/venv/bin/python -m pip install --no-compile --require-hashes -r requirements/serve.txt \
 && /opt/venv/bin/bnserve-train --out /build/models/default.ckpt \
 && /opt/venv/bin/bnserve-export --checkpoint /build/models/default.ckpt --out /build/models/default.onnx

# docker compose --profile loadtest: locust with the checkpoint the baked model was exported from,
# so it can check every answer against the numpy reference. Not part of the runtime image.
FROM model AS loadtest
COPY requirements/loadtest.txt ./requirements/
RUN /opt/venv/bin/python -m pip install --no-compile --require-hashes -r requirements/loadtest.txt
COPY benchmarks/locustfile.py benchmarks/loadtest.py /build/benchmarks/
ENTRYPOINT ["/opt/venv/bin/python", "/build/benchmarks/loadtest.py", "--checkpoint", "/build/models/default.ckpt"]
CMD ["--host", "http://bnserve:8000"]

# The runtime environment: no installer left in it.
FROM build AS venv
RUN /opt/venv/bin/python -m pip uninstall --yes --quiet wheel setuptools pip

# The image users run: the virtual environment, the model, nothing else.
FROM base AS runtime
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin bnserve
COPY --from=venv /opt/venv /opt/venv
COPY --from=model /build/models/default.onnx /opt/bnserve/models/default.onnx
ENV PATH=/opt/venv/bin:$PATH \
    BNSERVE_MODEL_PATH=/opt/bnserve/models/default.onnx \
    BNSERVE_HOST=0.0.0.0 \
    BNSERVE_PORT=8000
WORKDIR /opt/bnserve
USER 10001:10001
EXPOSE 8000
# No curl in the image: the health check is a few lines of Python's standard library.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('BNSERVE_PORT', '8000'), timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["bnserve-serve"]
