# Everything runs from a local venv that this Makefile creates: nothing is installed by hand.
#
# PY picks the interpreter (default: python3 on PATH). Each interpreter gets its own venv and its
# own cargo target directory, so switching between them rebuilds nothing twice:
#   python3      -> .venv            target/
#   other PY     -> .venv-<tag>      target/py-<tag>/     (<tag>: 3.13, 3.13t, ...)
# `make pythons` builds CPython 3.13 and 3.13t from Debian's source into ~/.cache/kameo/pythons
# (scripts/build-python.sh); `make test-all` runs the whole suite on 3.11, 3.13 and 3.13t.
PYTHON ?= python3
PY ?= $(PYTHON)
PYTAG := $(shell $(PY) -c 'import sys, sysconfig; v = sys.version_info; print(f"{v[0]}.{v[1]}" + ("t" if sysconfig.get_config_var("Py_GIL_DISABLED") else ""))' 2>/dev/null)
ifeq ($(PYTAG),)
$(error PY=$(PY) is not a Python interpreter that runs)
endif
ifeq ($(PY),python3)
VENV := .venv
export CARGO_TARGET_DIR ?= $(abspath target)
else
VENV := .venv-$(PYTAG)
export CARGO_TARGET_DIR ?= $(abspath target/py-$(PYTAG))
endif
BIN := $(VENV)/bin
export CARGO_BUILD_JOBS ?= 2
STAMP := $(VENV)/.deps-stamp
# mypy (for `make lint`, run on the default venv) is left out of free-threaded venvs: its newest
# releases need ast-serialize, which has no free-threaded wheel and does not build from source.
MYPY := $(if $(filter %t,$(PYTAG)),,"mypy>=1.11")
NATIVE_SRC := $(shell find crates -name '*.rs' -o -name Cargo.toml) Cargo.toml pyproject.toml
BUILD_PYTHON := scripts/build-python.sh

.PHONY: all venv develop test test-all test-rust test-python pythons wheels wheel demo demo-rust bench bench-host lint fmt fuzz clean

all: develop

$(BIN)/python:
	$(PY) -m venv $(VENV)

# --prefer-binary: the newest release with a wheel for this interpreter (numpy's latest have none
# for 3.13t, and building numpy from source takes longer than the whole test run).
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --prefer-binary "maturin>=1.9,<2" "pytest>=8" "pytest-asyncio>=1.0" \
		"pytest-timeout>=2.3" "pytest-benchmark>=4" "hypothesis>=6" "ruff>=0.6" $(MYPY) \
		"numpy>=1.24" "tqdm>=4.66" "cloudpickle>=3" "uv>=0.4" \
		"opentelemetry-api>=1.20" "opentelemetry-sdk>=1.20"  # optional for users (extras); tests cover them
	# orjson (kameo[json]) has no wheel for every interpreter (none for free-threaded 3.13t):
	# where it has none, the tests of its path are skipped and the stdlib path is tested.
	$(BIN)/python -m pip install --quiet --only-binary :all: "orjson>=3.9" \
		|| echo "orjson: no wheel for this interpreter; kameo map's tests use the stdlib JSON path"
	touch $@

venv: $(STAMP)

# Build the extension (release) and install kameo into the venv in editable mode.
$(VENV)/.native-stamp: $(STAMP) $(NATIVE_SRC)
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(BIN)):$$PATH $(BIN)/maturin develop --release --quiet
	touch $@

develop: $(VENV)/.native-stamp

test: test-rust test-python

# The Pythons users have: the system 3.11, and 3.13 and free-threaded 3.13t built from source
# once (a second run finds them in the cache and costs seconds).
pythons:
	$(BUILD_PYTHON) 3.13
	$(BUILD_PYTHON) 3.13 --disable-gil

# cargo test once (its crates do not depend on the interpreter), pytest on each interpreter;
# on 3.13t with PYTHON_GIL=0 (tests/test_threads.py checks, without it, that importing kameo
# leaves the GIL off).
# On 3.11 the whole suite runs in both start modes; on 3.13 and 3.13t in exec mode, and the
# zygote's own tests in zygote mode (the whole suite twice on each would take 15 more minutes).
test-all: test-rust
	$(MAKE) test-python
	$(MAKE) test-python START=exec PY="$$($(BUILD_PYTHON) 3.13 | tail -n 1)"
	$(MAKE) test-python START=zygote PYTEST_ARGS=tests/test_zygote.py \
		PY="$$($(BUILD_PYTHON) 3.13 | tail -n 1)"
	PYTHON_GIL=0 $(MAKE) test-python START=exec \
		PY="$$($(BUILD_PYTHON) 3.13 --disable-gil | tail -n 1)"
	PYTHON_GIL=0 $(MAKE) test-python START=zygote PYTEST_ARGS=tests/test_zygote.py \
		PY="$$($(BUILD_PYTHON) 3.13 --disable-gil | tail -n 1)"

# One wheel per interpreter into dist/: cp311 (the system python3), cp313 and cp313t (built
# from source on first use, as for test-all).
wheels:
	$(MAKE) wheel
	$(MAKE) wheel PY="$$($(BUILD_PYTHON) 3.13 | tail -n 1)"
	$(MAKE) wheel PY="$$($(BUILD_PYTHON) 3.13 --disable-gil | tail -n 1)"
	ls -l dist/

wheel: $(STAMP)
	$(BIN)/maturin build --release --quiet --out dist --interpreter $(abspath $(BIN)/python)

# KAMEO_TEST_PYTHON: kameo-host's tests check its serde layer against this venv's Python codec
# (kameo._native), so the extension is built first.
test-rust: develop
	KAMEO_TEST_PYTHON=$(abspath $(BIN)/python) cargo test --workspace --quiet

# The suite once per start mode (Pool(start=...)'s default in the run, tests/conftest.py):
# workers exec'd, and workers forked by a zygote.
START ?= exec zygote
PYTEST_ARGS ?=
test-python: develop
	set -e; for start in $(START); do \
		$(BIN)/python -m pytest -q --start=$$start $(PYTEST_ARGS); done

demo: develop
	$(BIN)/python examples/demo.py

# The Rust host's example (examples/rust_host): a Rust program drives Python strategy workers,
# which stream ticks from its DataFetch callback. KAMEO_PYTHON: the venv's interpreter (kameo).
demo-rust: develop
	KAMEO_PYTHON=$(abspath $(BIN)/python) cargo run -q -p kameo-example-trading --release

bench: develop
	# the peers compared against: loky in bench_resilience, the msgpack/JSON codecs in bench_codec
	$(BIN)/python -m pip install --quiet loky ormsgpack msgpack orjson mpire
	$(BIN)/python benches/bench_pool.py
	$(BIN)/python benches/bench_resilience.py
	$(BIN)/python benches/bench_start.py
	$(BIN)/python benches/bench_codec.py
	$(BIN)/python -m pytest benches/test_bench_ask.py --benchmark-only -q
	cargo bench -p kameo-proto

# kameo-host (the Rust host) against the Python parent (kameo.Pool) on the same workloads, in
# one run: round trip of one small ask, and 20,000 pipelined asks on 2 workers. The script
# builds and runs crates/kameo-host/benches/host.rs (--release) and prints the ratios.
bench-host: develop
	KAMEO_PYTHON=$(abspath $(BIN)/python) $(BIN)/python benches/bench_host.py

lint: develop
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings
	$(BIN)/ruff check python tests benches examples
	$(BIN)/ruff format --check python tests benches examples
	$(BIN)/mypy --strict python/
	$(BIN)/python -m mypy.stubtest kameo._native

# Fuzz the frame reader, the handshake, the value decoder (wire structure), the pyo3 decoder
# itself in an embedded interpreter, and kameo-host's serde_py deserializer (cargo-fuzz, libFuzzer + ASan).
# The toolchain is stable: RUSTC_BOOTSTRAP lets cargo-fuzz pass its sanitizer flags.
# py_decode embeds the venv's Python when there is a venv, with its packages (numpy) importable.
FUZZ_SECONDS ?= 20
FUZZ_TARGETS := frame_reader handshake value_decode py_decode serde_py
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
	rm -rf .venv .venv-* target dist
