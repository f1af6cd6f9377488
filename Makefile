# signaling-sharded: `make run` starts the server, `make test` runs every test.
# Everything below builds into ./.venv; nothing is installed system-wide.
#
# .venv holds what building and running need: pip and maturin, then the
# package with its runtime dependencies (`maturin develop`). The tools of
# `test`, `lint` and `bench` come from pyproject.toml's dependency groups,
# each installed the first time a target needs it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
ARGS   ?=
export VIRTUAL_ENV := $(abspath $(VENV))

RUST_SOURCES := Cargo.toml Cargo.lock $(shell find rust -name '*.rs')
PY_SOURCES   := pyproject.toml $(shell find python -name '*.py' -o -name '*.pyi' -o -name '*.lua')

# Facts that pyproject.toml states once: the build requirement (maturin) and
# the lowest Python the package claims.
MATURIN_REQ   := $(shell sed -n 's/^requires = \["\(maturin[^"]*\)"\]$$/\1/p' pyproject.toml)
FLOOR_VERSION := $(shell sed -n 's/^requires-python = ">=\([0-9.]*\)"$$/\1/p' pyproject.toml)

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# pip 25.1 is the first to install dependency groups (--group).
$(BIN)/.build-deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=25.1" "$(MATURIN_REQ)"
	touch $@

# One dependency group of pyproject.toml, e.g. $(BIN)/.group-test.
$(BIN)/.group-%: $(BIN)/.build-deps
	$(PY) -m pip install -q --group $*
	touch $@

# Programs the tests drive: a Chromium (the browser test; CHROMIUM names
# another build, e.g. /usr/bin/google-chrome) and redis-server (cluster
# mode). Debian's packages are installed with apt-get when missing and
# possible (root, or sudo without a password); otherwise the tests that need
# them say why they are skipped.
export CHROMIUM ?= /usr/bin/chromium

.PHONY: system-deps
system-deps: ## Install the programs the tests drive (chromium, redis-server) with apt-get
	@missing=""; \
	[ -x "$(CHROMIUM)" ] || missing="$$missing chromium"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "not root and no sudo: cannot install$$missing; tests that need it are skipped"; exit 0; fi; \
	echo "installing$$missing"; \
	$$sudo apt-get update -q >/dev/null && \
	DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends $$missing >/dev/null

$(BIN)/.built: $(BIN)/.build-deps $(RUST_SOURCES) $(PY_SOURCES)
	$(BIN)/maturin develop --release --quiet --features test-hooks
	touch $@

.PHONY: build
build: $(BIN)/.built ## Build the Rust core and install the package into .venv

.PHONY: run
run: build ## Build and start the server with 4 workers on port $PORT or 8081 (ARGS= adds flags)
	$(BIN)/signaling-sharded --workers 4 $(ARGS)

.PHONY: wheel
wheel: $(BIN)/.build-deps ## Build the abi3 wheel (one wheel for every CPython claimed, Linux) into dist/
	$(BIN)/maturin build --release --out dist

.PHONY: test
test: build $(BIN)/.group-test system-deps ## Run every test: cargo test, then pytest against the real server
	cargo test --quiet
	cargo build --release --quiet -p signaling-bench
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The floor: a virtualenv of its own with the lowest Python the package
# claims, the package built from source by the lowest maturin allowed, and
# the lowest versions of its dependencies and test tools that pyproject.toml
# allows (uv's lowest-direct resolution: the named packages at their lower
# bounds, what they pull in at its newest). The tests start the server next
# to the venv's python, so they run against that venv's install.
# FLOOR_PYTHON names the interpreter; else pyenv's, else python3.X on PATH.
# The same on another Python with the newest versions, e.g.:
#   make test-floor FLOOR_VERSION=3.13 RESOLUTION=highest FLOOR_VENV=.venv-3.13
FLOOR_VENV  ?= .venv-floor
RESOLUTION  ?= lowest-direct
FLOOR_PYTHON ?= $(or $(shell p=$$(pyenv prefix $(FLOOR_VERSION) 2>/dev/null) && echo "$$p/bin/python$(FLOOR_VERSION)"),$(shell command -v python$(FLOOR_VERSION) 2>/dev/null))
FLOOR_ENV   := VIRTUAL_ENV=$(abspath $(FLOOR_VENV)) PATH=$(abspath $(FLOOR_VENV))/bin:$$PATH UV_PYTHON_DOWNLOADS=never UV_NO_CONFIG=1
UV          := $(FLOOR_ENV) $(abspath $(BIN))/uv
# Wheels only, as on a machine without compilers: the newest release of a
# dependency's dependency may be an sdist alone (av 14.4.0, under aiortc 1.13).
UV_INSTALL  := --resolution $(RESOLUTION) --only-binary :all:

.PHONY: test-floor
test-floor: $(BIN)/.group-floor system-deps ## Every test on the lowest Python and dependency versions claimed (.venv-floor)
	@if [ -z "$(FLOOR_PYTHON)" ] || [ ! -x "$(FLOOR_PYTHON)" ]; then \
		echo "test-floor: no Python $(FLOOR_VERSION) found (\"$(FLOOR_PYTHON)\"): install it" \
			"(pyenv install $(FLOOR_VERSION)) or name it: make test-floor FLOOR_PYTHON=/path/to/python$(FLOOR_VERSION)" >&2; \
		exit 1; fi
	@"$(FLOOR_PYTHON)" -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(None if v == "$(FLOOR_VERSION)" else "$(FLOOR_PYTHON) is Python " + v)'
	rm -rf $(FLOOR_VENV)
	$(UV) venv --quiet --python "$(FLOOR_PYTHON)" $(FLOOR_VENV)
	$(UV) pip install --quiet $(UV_INSTALL) "$(MATURIN_REQ)"
	$(FLOOR_ENV) maturin build --release --quiet --features test-hooks --out $(FLOOR_VENV)/dist
	$(UV) pip install --quiet $(UV_INSTALL) -r pyproject.toml --group test $(FLOOR_VENV)/dist/*.whl
	$(UV) pip list
	$(FLOOR_ENV) python -m pytest -q $(PYTEST_ARGS)

.PHONY: lint
lint: build $(BIN)/.group-lint $(BIN)/.group-test ## ruff, mypy (with stubtest), import contracts, cargo fmt --check, clippy -D warnings
	$(BIN)/ruff check python tests bench testkit
	$(BIN)/ruff format --check python tests bench testkit
	$(BIN)/mypy
	$(BIN)/mypy --strict bench/run.py bench/soak.py bench/cluster.py bench/resume.py bench/webhook_sink.py
	$(PY) -m mypy.stubtest signaling_sharded._native
	$(BIN)/lint-imports
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --all-targets --features python,test-hooks -- -D warnings

# Options of bench/run.py, e.g. BENCH_ARGS="--only relay,connect"; ROUNDS=5 and
# BENCH_QUICK=1 (short runs, 1 round) are read from the environment.
BENCH_ARGS ?=

.PHONY: bench
bench: build $(BIN)/.group-bench ## Every bench scenario, ours vs the Go design on one pinned core each (~10 min)
	cargo build --release --quiet -p signaling-bench
	PYTHONPATH=$(CURDIR) $(PY) bench/run.py $(BENCH_ARGS)

.PHONY: bench-cluster
bench-cluster: build system-deps ## Cluster mode: CPU of a relay across Redis vs a local one (paced and flat out), of a join; ROUNDS, DURATION, RATE, JOINS
	cargo build --release --quiet -p signaling-bench
	PYTHONPATH=$(CURDIR) $(PY) bench/cluster.py

.PHONY: bench-scale
bench-scale: build ## 100,000 idle peers on --workers 6: RSS per peer, relay p99 of 100 pairs and joins while held (PEERS, WORKERS, PROCESSES, PAIRS, RATE, DURATION, SOURCE_IPS; SERVER_ARGS: more server flags; IDLE_PIDS: run these at SCHED_IDLE meanwhile)
	cargo build --release --quiet -p signaling-bench
	PYTHONPATH=$(CURDIR) $(PY) bench/scale.py

.PHONY: bench-resume
bench-resume: build ## Resume: relays to sessions cut at random; lost and duplicated must be 0 (DURATION, WORKERS, SERVERS=2: a cluster)
	cargo build --release --quiet -p signaling-bench
	PYTHONPATH=$(CURDIR) $(PY) bench/resume.py

.PHONY: soak
soak: build ## Churn for 10 min (SOAK_SECONDS) against 2 workers; fail on leaks or ghosts
	cargo build --release --quiet -p signaling-bench
	PYTHONPATH=$(CURDIR) $(PY) bench/soak.py

.PHONY: clean
clean: ## Remove build products and the venvs
	rm -rf target $(VENV) $(FLOOR_VENV) dist
