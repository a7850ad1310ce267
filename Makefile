# Everything runs inside .venv, made from pyproject.toml.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORE ?= model_store
export TF_ENABLE_ONEDNN_OPTS ?= 1
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install system-deps demo serve test lint audit lock bench clean

# uv (its version from the lock) installs the locked versions: the same set pip picks, five times sooner
$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet "$$(grep '^uv==' requirements.lock)"

install: $(BIN)/python
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[train,dev,hed]' -c requirements.lock

# Quick start: install, train the demo model if the store has none, serve on port 8000.
demo: install
	$(BIN)/python -m train demo --store $(STORE) --if-missing
	IMGSERVE_MODEL_STORE=$(STORE) $(BIN)/python -m service

serve:
	IMGSERVE_MODEL_STORE=$(STORE) $(BIN)/python -m service

system-deps:
	bash scripts/install-system-deps.sh

# three pytest-xdist workers on two cores (the tests wait on servers and containers as much as they
# compute), a test file to each at a time (module fixtures start their server once), in the order
# tests/conftest.py gives (compose first, then slow files)
TEST_WORKERS ?= 3
test: system-deps install
	$(BIN)/ruff check service train tests bench fuzz scripts
	$(BIN)/mypy service train
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint:
	$(BIN)/ruff check service train tests bench fuzz scripts
	$(BIN)/mypy service train

# Known vulnerabilities in the locked versions, against the offline PyPA advisory snapshot in
# ../shared/advisories (ADVISORIES=DIR for another copy) and pip-audit's online services where they
# answer; fails on any finding not in audit-allowlist.toml, and when nothing could be audited.
ADVISORIES ?= ../shared/advisories/pypa
audit:
	$(BIN)/python scripts/audit.py --advisories $(ADVISORIES)

# Refresh the lock file from the current environment.
lock:
	$(BIN)/uv pip freeze --python $(BIN)/python --exclude-editable | grep -v '^imgserve' > requirements.lock

bench:
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
