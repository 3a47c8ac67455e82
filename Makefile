# One entry point per job a newcomer has: `make serve` (demo) and `make test` (everything).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-images
DEMO_CACHE ?= .demo-cache
LISTEN ?= 127.0.0.1:5000
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup system-deps serve demo test lint typecheck pytest bench clean

setup: system-deps $(BIN)/.installed

system-deps:
	./scripts/install-system-deps.sh

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/python tools/make_demo.py $(DEMO_DIR)

serve: demo
	$(BIN)/simple-oci-registry serve --dir $(DEMO_DIR) --listen $(LISTEN) --cache-dir $(DEMO_CACHE)

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests tools bench

typecheck: $(BIN)/.installed
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

bench: setup
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) $(DEMO_CACHE) bench-results .pytest_cache .mypy_cache .ruff_cache
