# `make test` works on a fresh machine with only Python and make: it creates
# .venv and installs the package with its dev extras on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider
# PyPI's newest torch pulls about 3 GB of CUDA wheels. Asked for this exact
# version, the package index of the machines kerasbn is built and tested on
# offers a CPU-only build, which keeps a fresh-clone `make test` fast.
# Elsewhere: TORCH="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH  ?= torch==2.13.0

export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: install lint format test test-large test-large-slice test-fast test-jax test-torch docs demo qat-demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q $(TORCH)
	touch $(STAMP)

install: $(STAMP)

## ruff: lint and formatting, as CI runs them.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## The whole suite on the TensorFlow backend, then the layer tests on JAX and on torch (under 20 minutes on
## 2 cores); the tests marked `large` (the biggest keras-hub test configs, every keras-hub backbone's export, the
## user-path matrix beyond its sample: about two hours on 2 cores) run in test-large.
test: $(STAMP)
	KERAS_BACKEND=tensorflow $(PYTEST) -m "not large"
	$(MAKE) --no-print-directory test-jax
	$(MAKE) --no-print-directory test-torch

test-jax: $(STAMP)
	KERAS_BACKEND=jax $(PYTEST) tests/layers tests/ops

test-torch: $(STAMP)
	KERAS_BACKEND=torch $(PYTEST) -m "not large" tests/layers tests/ops

test-large: $(STAMP)
	KERAS_BACKEND=tensorflow $(PYTEST) -m large
	KERAS_BACKEND=torch $(PYTEST) -m large tests/layers tests/ops

## CI's share of the large tests: slice K of LARGE_SLICES by a hash of each test's id, K the HEAD commit's hash
## mod LARGE_SLICES (tests/conftest.py, --slice), so each commit runs a different twelfth (about 10 minutes on
## 2 cores) and every large test runs within a few submissions. SLICE=K/N runs a given slice again.
LARGE_SLICES ?= 12
SLICE ?= commit/$(LARGE_SLICES)
test-large-slice: $(STAMP)
	KERAS_BACKEND=tensorflow $(PYTEST) -m large --slice $(SLICE)

## A quick subset: everything not marked slow, TensorFlow backend.
test-fast: $(STAMP)
	KERAS_BACKEND=tensorflow $(PYTEST) -m "not slow"

## The documentation site, strict: a broken link, a page outside the nav or a docstring naming a missing
## function fails. The dev extras include the docs tools.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

demo: $(STAMP)
	$(BIN)/python examples/demo.py

## PTQ against QAT on digits at 8, 4 and 3 weight bits, 4 seeds; the 8-bit QAT model exported to int8 LiteRT
## and ONNX and scored in their runtimes (build/qat/; 38 minutes on 2 cores under heavy load).
qat-demo: $(STAMP)
	$(BIN)/python examples/qat.py

bench: $(STAMP)
	$(BIN)/python benchmarks/layer.py
	$(BIN)/python benchmarks/fold.py
	$(BIN)/python examples/plot_benchmarks.py

clean:
	rm -rf build site .pytest_cache
