# signaling-sharded: `make run` starts the server, `make test` runs every test.
# Everything below builds into ./.venv; nothing is installed system-wide.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
ARGS   ?=
export VIRTUAL_ENV := $(abspath $(VENV))

RUST_SOURCES := Cargo.toml Cargo.lock $(shell find rust -name '*.rs')
PY_SOURCES   := pyproject.toml $(shell find python -name '*.py' -o -name '*.pyi' -o -name '*.lua')

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.8,<2" "websockets>=16.0" "uvloop>=0.21.0" "PyJWT>=2.8.0" "redis[hiredis]>=5.0.1" \
		"pytest>=8.3" "pytest-timeout>=2.3" "hypothesis>=6.100" "prometheus_client>=0.20" \
		"playwright>=1.45" "aiortc>=1.9" "ruff>=0.11" "mypy>=1.15"
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

$(BIN)/.built: $(BIN)/.deps $(RUST_SOURCES) $(PY_SOURCES)
	$(BIN)/maturin develop --release --quiet --features test-hooks
	touch $@

.PHONY: build
build: $(BIN)/.built ## Build the Rust core and install the package into .venv

.PHONY: run
run: build ## Build and start the server with 4 workers on port $$PORT or 8081 (ARGS= adds flags)
	$(BIN)/signaling-sharded --workers 4 $(ARGS)

.PHONY: wheel
wheel: $(BIN)/.deps ## Build the abi3 wheel (one wheel for CPython 3.9+) into dist/
	$(BIN)/maturin build --release --out dist

.PHONY: test
test: build system-deps ## Run every test: cargo test, then pytest against the real server
	cargo test --quiet
	cargo build --release --quiet -p signaling-bench
	$(PY) -m pytest -q $(PYTEST_ARGS)

.PHONY: lint
lint: build ## ruff, mypy (with stubtest), cargo fmt --check, clippy -D warnings
	$(BIN)/ruff check python tests bench
	$(BIN)/ruff format --check python tests bench
	$(BIN)/mypy
	$(BIN)/mypy --strict bench/run.py bench/soak.py bench/cluster.py
	$(PY) -m mypy.stubtest signaling_sharded._native
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings

# Options of bench/run.py, e.g. BENCH_ARGS="--only relay,connect"; ROUNDS=5 and
# BENCH_QUICK=1 (short runs, 1 round) are read from the environment.
BENCH_ARGS ?=

.PHONY: bench
bench: build ## Every bench scenario, ours vs the Go design on one pinned core each (~10 min)
	$(PY) -m pip install -q matplotlib
	cargo build --release --quiet -p signaling-bench
	PYTHONPATH=$(CURDIR) $(PY) bench/run.py $(BENCH_ARGS)

.PHONY: bench-cluster
bench-cluster: build system-deps ## Cluster mode: relays/s of topics split over two servers vs one (Redis)
	cargo build --release --quiet -p signaling-bench
	PYTHONPATH=$(CURDIR) $(PY) bench/cluster.py

.PHONY: soak
soak: build ## Churn for 10 min (SOAK_SECONDS) against 2 workers; fail on leaks or ghosts
	cargo build --release --quiet -p signaling-bench
	PYTHONPATH=$(CURDIR) $(PY) bench/soak.py

.PHONY: clean
clean: ## Remove build products and the venv
	rm -rf target $(VENV) dist
