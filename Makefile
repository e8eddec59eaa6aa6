# Everything runs from a local venv that this Makefile creates: nothing is installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CARGO_BUILD_JOBS ?= 2
STAMP := $(VENV)/.deps-stamp
NATIVE_SRC := $(shell find crates -name '*.rs' -o -name Cargo.toml) Cargo.toml pyproject.toml

.PHONY: all venv develop test test-rust test-python demo bench lint fmt clean

all: develop

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "maturin>=1.9,<2" "pytest>=8" "pytest-asyncio>=1.0" \
		"pytest-timeout>=2.3" "pytest-benchmark>=4" "hypothesis>=6" "ruff>=0.6" "mypy>=1.11"
	touch $@

venv: $(STAMP)

# Build the extension (release) and install kameo into the venv in editable mode.
$(VENV)/.native-stamp: $(STAMP) $(NATIVE_SRC)
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(BIN)):$$PATH $(BIN)/maturin develop --release --quiet
	touch $@

develop: $(VENV)/.native-stamp

test: test-rust test-python

test-rust:
	cargo test --workspace --quiet

test-python: develop
	$(BIN)/python -m pytest -q

demo: develop
	$(BIN)/python examples/demo.py

bench: develop
	$(BIN)/python benches/bench_pool.py
	$(BIN)/python benches/compare_codec.py
	cargo bench -p kameo-proto

lint: develop
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings
	$(BIN)/ruff check python tests benches examples
	$(BIN)/ruff format --check python tests benches examples
	$(BIN)/mypy --strict python/
	$(BIN)/python -m mypy.stubtest kameo._native

fmt: $(STAMP)
	cargo fmt --all
	$(BIN)/ruff format python tests benches examples
	$(BIN)/ruff check --fix python tests benches examples

clean:
	rm -rf $(VENV) target
