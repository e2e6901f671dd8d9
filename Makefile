# bnserve: `make serve` trains/exports the default model if missing, then serves it;
# `make test` runs lint, type checks and the whole test suite. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MODEL := models/default.onnx
CHECKPOINT := models/default.ckpt

.PHONY: serve model test lint compare clean

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

clean:
	rm -rf $(VENV) models reports .pytest_cache .mypy_cache .ruff_cache
