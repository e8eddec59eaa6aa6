# Everything runs from a local venv that this Makefile creates: nothing is installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CARGO_BUILD_JOBS ?= 2
STAMP := $(VENV)/.deps-stamp
NATIVE_SRC := $(shell find crates -name '*.rs' -o -name Cargo.toml) Cargo.toml pyproject.toml

.PHONY: all venv develop test test-rust test-python demo bench lint fmt fuzz clean

all: develop

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "maturin>=1.9,<2" "pytest>=8" "pytest-asyncio>=1.0" \
		"pytest-timeout>=2.3" "pytest-benchmark>=4" "hypothesis>=6" "ruff>=0.6" "mypy>=1.11" \
		"numpy>=1.24"  # optional for users; the codec tests cover arrays
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
	# the peers compared against: loky in bench_resilience, the msgpack/JSON codecs in bench_codec
	$(BIN)/python -m pip install --quiet loky ormsgpack msgpack orjson
	$(BIN)/python benches/bench_pool.py
	$(BIN)/python benches/bench_resilience.py
	$(BIN)/python benches/bench_codec.py
	$(BIN)/python -m pytest benches/test_bench_ask.py --benchmark-only -q
	cargo bench -p kameo-proto

lint: develop
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings
	$(BIN)/ruff check python tests benches examples
	$(BIN)/ruff format --check python tests benches examples
	$(BIN)/mypy --strict python/
	$(BIN)/python -m mypy.stubtest kameo._native

# Fuzz the frame reader, the handshake, the value decoder (wire structure) and the pyo3 decoder
# itself in an embedded interpreter (cargo-fuzz, libFuzzer + ASan).
# The toolchain is stable: RUSTC_BOOTSTRAP lets cargo-fuzz pass its sanitizer flags.
# py_decode embeds the venv's Python when there is a venv, with its packages (numpy) importable.
FUZZ_SECONDS ?= 20
FUZZ_TARGETS := frame_reader handshake value_decode py_decode
FUZZ_ENV = $(if $(wildcard $(BIN)/python),PYO3_PYTHON=$(abspath $(BIN)/python) \
	PYTHONPATH=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"))
fuzz:
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	mkdir -p fuzz/logs
	for t in $(FUZZ_TARGETS); do \
		$(FUZZ_ENV) RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz $$t -- -max_total_time=$(FUZZ_SECONDS) \
			> fuzz/logs/$$t.log 2>&1 || { tail -n 60 fuzz/logs/$$t.log; exit 1; }; \
		echo "fuzz $$t: $$(grep -E '^Done [0-9]+ runs' fuzz/logs/$$t.log)"; \
	done

fmt: $(STAMP)
	cargo fmt --all
	$(BIN)/ruff format python tests benches examples
	$(BIN)/ruff check --fix python tests benches examples

clean:
	rm -rf $(VENV) target
