# bnserve: `make serve` trains/exports the default model if missing, then serves it;
# `make test` runs lint, type checks and the whole test suite. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MODEL := models/default.onnx
CHECKPOINT := models/default.ckpt

.PHONY: serve model test lint compare bench loadtest container-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "bnserve needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

$(MODEL): | $(STAMP)
	$(BIN)/bnserve-train --out $(CHECKPOINT)
	$(BIN)/bnserve-export --checkpoint $(CHECKPOINT) --out $(MODEL)

model: $(MODEL)

serve: $(MODEL)
	BNSERVE_MODEL_PATH=$(MODEL) $(BIN)/bnserve-serve

compare: | $(STAMP)
	$(BIN)/bnserve-compare

lint: | $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

# Benchmarks (issue 5): installs its own load generator, bounded in time, prints a table.
bench: $(MODEL)
	$(BIN)/python benchmarks/run.py

# Locust against a running service (default: make serve's); fails on any error or a slow p99.
LOADTEST_HOST ?= http://127.0.0.1:8000
LOADTEST_TIME ?= 30s
LOADTEST_USERS ?= 16
LOADTEST_P99_MS ?= 50
loadtest: | $(STAMP)
	$(BIN)/python benchmarks/loadtest.py --host $(LOADTEST_HOST) --run-time $(LOADTEST_TIME) \
		--users $(LOADTEST_USERS) --p99-ms $(LOADTEST_P99_MS)

container-smoke:
	scripts/container-smoke.sh

clean:
	rm -rf $(VENV) models reports .pytest_cache .mypy_cache .ruff_cache
