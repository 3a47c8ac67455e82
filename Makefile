# One entry point per job a newcomer has: `make serve` (demo) and `make test` (everything).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-images
DEMO_CACHE ?= .demo-cache
LISTEN ?= 127.0.0.1:5000
PYTEST_ARGS ?=
BENCH_ARGS ?=
# make image: see scripts/build-image.sh. The .oci archive lands in the demo directory, so
# `make serve` serves the registry's own image as simple-oci-registry:<version>.
IMAGE_NAME ?= localhost/simple-oci-registry
IMAGE_OCI ?= $(DEMO_DIR)/simple-oci-registry/$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml).oci
IMAGE_CACHE_DIR ?= build/image-cache
BASE_IMAGE ?=

.PHONY: setup system-deps serve demo test lint typecheck pytest bench clean image lock

setup: system-deps $(BIN)/.installed

system-deps:
	./scripts/install-system-deps.sh

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

# Re-resolve every dependency in a fresh venv and rewrite constraints.txt (review the diff).
lock:
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/pip install -q --upgrade pip
	build/lock-venv/bin/pip install -q '.[test]'
	sed -n '/^#/p' constraints.txt > build/constraints.txt
	build/lock-venv/bin/pip freeze --all --exclude simple-oci-registry \
		| grep -v -i -E '^(setuptools|wheel)==' >> build/constraints.txt
	mv build/constraints.txt constraints.txt
	rm -rf build/lock-venv

# Offline-capable image build; writes $(IMAGE_OCI) too (scripts/build-image.sh).
image: $(BIN)/.installed
	IMAGE_NAME=$(IMAGE_NAME) IMAGE_OCI=$(IMAGE_OCI) IMAGE_CACHE_DIR=$(IMAGE_CACHE_DIR) \
		BASE_IMAGE=$(BASE_IMAGE) PYTHON=$(BIN)/python ./scripts/build-image.sh

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
	rm -rf $(VENV) $(DEMO_DIR) $(DEMO_CACHE) build bench-results .pytest_cache .mypy_cache .ruff_cache
