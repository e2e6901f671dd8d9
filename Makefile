# bnserve. The set-up is two commands; both create .venv on first use, from the lock files in
# requirements/ (exact versions, hash-checked: `make lock` regenerates them from pyproject.toml):
#   make serve   installs what serving and the default model need (requirements/serve.txt), trains
#                and exports the default model if it is missing, and serves it on 127.0.0.1:8000
#   make test    installs the development tools too (requirements/dev.txt); ruff, mypy and every test
#   make test-fast   the same without the slow tests (training, export, real servers)
#
# Which model: MODEL=... on the command line wins, else $BNSERVE_MODEL_PATH from the environment,
# else models/default.onnx. CHECKPOINT defaults to MODEL with .ckpt (models/default.ckpt). A missing
# MODEL is exported from CHECKPOINT; only the default checkpoint is ever trained here.
#   make serve MODEL=models/my.onnx            BNSERVE_MODEL_PATH=models/my.onnx make serve
#   make model MODEL=models/my.onnx CHECKPOINT=models/my.ckpt
#   make loadtest CHECKPOINT=models/my.ckpt    (the rows and expected classes come from it)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# One stamp per lock file. Each lock file holds every package of the one before it, at the same
# version (runtime.txt < serve.txt < loadtest.txt < dev.txt), so installing dev.txt also satisfies
# serve and loadtest: `make test` then `make serve` installs nothing more.
SERVE_STAMP := $(VENV)/.serve-stamp
LOADTEST_STAMP := $(VENV)/.loadtest-stamp
DEV_STAMP := $(VENV)/.dev-stamp
# uv installs from the lock files: a fresh `make serve` to /readyz in about 13 s here, against 41 s
# with pip (which spends most of it unpacking and compiling). uv itself comes from the registry,
# pinned and hash-checked (requirements/uv.txt), installed into .venv by the system's pip (`pip
# --python`), or, where the system Python has no pip, by the pip that ensurepip puts into .venv.
# The lock files also carry setuptools and wheel (pyproject's build-system), so bnserve itself
# installs without an unpinned build environment, and pip, so that .venv has one.
UV := $(BIN)/uv
PIP_FLAGS := --disable-pip-version-check --quiet
INSTALL_LOCKED = $(UV) pip install --quiet --python $(BIN)/python --require-hashes -r $(1) \
	&& $(UV) pip install --quiet --python $(BIN)/python --no-deps --no-build-isolation -e .

DEFAULT_MODEL := models/default.onnx
DEFAULT_CHECKPOINT := models/default.ckpt
MODEL := $(or $(BNSERVE_MODEL_PATH),$(DEFAULT_MODEL))
CHECKPOINT := $(basename $(MODEL)).ckpt

.PHONY: serve model test test-fast lint chromium promtool compare bench bench-drift loadtest lock container-smoke clean recalibration-study

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "bnserve needs Python >= 3.11"'
	$(PYTHON) -m venv --without-pip $(VENV)

$(UV): requirements/uv.txt | $(BIN)/python
	@if $(PYTHON) -m pip --version >/dev/null 2>&1; then \
	  echo "$(PYTHON) -m pip --python $(BIN)/python install --require-hashes -r requirements/uv.txt"; \
	  $(PYTHON) -m pip $(PIP_FLAGS) --python $(BIN)/python install --require-hashes -r requirements/uv.txt; \
	else \
	  echo "$(BIN)/python -m ensurepip && $(BIN)/python -m pip install --require-hashes -r requirements/uv.txt"; \
	  $(BIN)/python -m ensurepip --default-pip >/dev/null \
	    && $(BIN)/python -m pip $(PIP_FLAGS) install --require-hashes -r requirements/uv.txt; \
	fi
	touch $@

$(SERVE_STAMP): requirements/serve.txt pyproject.toml | $(UV)
	$(call INSTALL_LOCKED,requirements/serve.txt)
	touch $@

$(LOADTEST_STAMP): requirements/loadtest.txt pyproject.toml | $(UV)
	$(call INSTALL_LOCKED,requirements/loadtest.txt)
	touch $@ $(SERVE_STAMP)

$(DEV_STAMP): requirements/dev.txt pyproject.toml | $(UV)
	$(call INSTALL_LOCKED,requirements/dev.txt)
	touch $@ $(LOADTEST_STAMP) $(SERVE_STAMP)

# Re-exported when its checkpoint is newer; a model with no checkpoint beside it (imported with
# --from-onnx, or copied in) is served as it is.
$(MODEL): $(wildcard $(CHECKPOINT)) | $(SERVE_STAMP)
ifeq ($(CHECKPOINT),$(DEFAULT_CHECKPOINT))
	test -f $(CHECKPOINT) || $(BIN)/bnserve-train --out $(CHECKPOINT)
else
	@test -f '$(CHECKPOINT)' || { \
	  echo "make: $(MODEL) does not exist, and there is no checkpoint $(CHECKPOINT) to export it from." >&2; \
	  echo "  Only the default model is trained by make. Train yours, then export it:" >&2; \
	  echo "    $(BIN)/bnserve-train --data my.csv --target label --out $(CHECKPOINT)" >&2; \
	  echo "    make model MODEL=$(MODEL) CHECKPOINT=$(CHECKPOINT)" >&2; \
	  echo "  or name a model that exists: make serve MODEL=models/<name>.onnx" >&2; \
	  exit 2; }
endif
	$(BIN)/bnserve-export --checkpoint $(CHECKPOINT) --out $(MODEL)

model: $(MODEL)

serve: $(MODEL) | $(SERVE_STAMP)
	BNSERVE_MODEL_PATH=$(MODEL) $(BIN)/bnserve-serve

compare: | $(SERVE_STAMP)
	$(BIN)/bnserve-compare

lint: | $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Everything: the README's test command, and what CI runs (.ci/run).
test: lint chromium promtool
	$(BIN)/pytest -q

# tests/deploy/test_monitoring.py checks the alert rules with Prometheus' own promtool, from
# Debian's prometheus package, installed like chromium when it is missing.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "$$SUDO apt-get install -y prometheus"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends prometheus >/dev/null; }

# tests/app/test_docs.py opens /docs in a real headless browser: Debian's chromium, installed
# with apt-get when it is missing (as root, or through sudo).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "$$SUDO apt-get install -y chromium"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends chromium >/dev/null; }

# The edit-test loop: lint, type checks and the tests not marked slow.
test-fast: lint promtool
	$(BIN)/pytest -q -m "not slow"

# Benchmarks (issue 5): installs its own load generator, bounded in time, prints a table.
bench: $(MODEL) | $(DEV_STAMP)
	$(BIN)/python benchmarks/run.py

# Only what drift monitoring costs (the A/B and in-process parts of make bench): a few minutes.
bench-drift: $(MODEL) | $(DEV_STAMP)
	$(BIN)/python benchmarks/run.py --drift-only

# The README's drift-detection table (issue 13): simulated drifts replayed through the exported
# model and app/drift.py's monitor; trains the default model afresh unless CHECKPOINT=... names
# one. About a minute; prints the tables, writes reports/drift-study.json.
.PHONY: drift-study
drift-study: | $(SERVE_STAMP)
	$(BIN)/python -m benchmarks.drift_study $(if $(filter command line,$(origin CHECKPOINT)),--checkpoint $(CHECKPOINT))

# Issue 13: held-out accuracy before and after bnserve-recalibrate on simulated shifts of the
# shipped data (seeded, about 10 s); prints markdown tables.
recalibration-study: | $(SERVE_STAMP)
	$(BIN)/python benchmarks/recalibration_study.py

# Locust against a running service (default: make serve's); fails on any error or a slow p99.
# The rows and the expected classes come from CHECKPOINT: the one the served model was exported from.
LOADTEST_HOST ?= http://127.0.0.1:8000
LOADTEST_TIME ?= 30s
LOADTEST_USERS ?= 16
LOADTEST_P99_MS ?= 50
loadtest: | $(LOADTEST_STAMP)
	@test -f '$(CHECKPOINT)' || { echo "make: no checkpoint $(CHECKPOINT) for the load test's rows: name the served model's with CHECKPOINT=..." >&2; exit 2; }
	$(BIN)/python benchmarks/loadtest.py --host $(LOADTEST_HOST) --run-time $(LOADTEST_TIME) \
		--users $(LOADTEST_USERS) --p99-ms $(LOADTEST_P99_MS) --checkpoint $(CHECKPOINT)

# Regenerates requirements/*.txt from pyproject.toml (and requirements/build.in: the build backend
# and pip) with the pinned uv (requirements/uv.in; uv.txt). Resolved against PyPI alone
# (uv reads no pip configuration), for any platform, Python 3.11 and later. Versions already
# locked are kept while they still satisfy pyproject.toml; `make lock UPGRADE=1` takes the newest.
# dev.txt is resolved first; the smaller files are constrained to its versions, so they agree.
LOCK_PLATFORM_ARGS := --universal --python-version 3.11
UV_COMPILE = $(BIN)/uv pip compile --quiet --generate-hashes $(LOCK_PLATFORM_ARGS) \
	--custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade)
lock: | $(UV)
	$(UV_COMPILE) requirements/uv.in -o requirements/uv.txt
	$(UV_COMPILE) pyproject.toml requirements/build.in --extra dev -o requirements/dev.txt
	$(UV_COMPILE) pyproject.toml requirements/build.in --extra export --extra loadtest \
		-c requirements/dev.txt -o requirements/loadtest.txt
	$(UV_COMPILE) pyproject.toml requirements/build.in --extra export \
		-c requirements/dev.txt -o requirements/serve.txt
	$(UV_COMPILE) pyproject.toml requirements/build.in \
		-c requirements/dev.txt -o requirements/runtime.txt

container-smoke:
	scripts/container-smoke.sh

clean:
	rm -rf $(VENV) models reports .pytest_cache .mypy_cache .ruff_cache
