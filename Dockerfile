# signaling-sharded container image.
#
#   docker build -t signaling-sharded .
#   docker run --rm -p 8081:8081 signaling-sharded
#
# Stage 1 builds the wheel (Rust core + Python package) with maturin; stage 2
# installs that wheel into a clean Python image, the same way `pip install .`
# does, so the image carries no compiler and no source tree.
#
# The layers are ordered by how often their inputs change: the Rust
# dependencies are compiled against a stub crate from the manifests alone,
# then the Rust sources, and only then come the Python sources and the
# README, which compile nothing: editing them repacks the wheel in seconds.
#
# Both images are Debian 12 (bookworm), so the wheel links against the glibc
# it then runs on. The versions are pinned; pin digests as well
# (python:3.12.13-slim-bookworm@sha256:...) where builds must be reproducible
# to the byte.

ARG PYTHON_IMAGE=python:3.12.13-slim-bookworm
ARG RUST_IMAGE=rust:1.95.0-slim-bookworm

# The Rust toolchain, copied from the official image rather than fetched.
FROM ${RUST_IMAGE} AS rust

# ---------------------------------------------------------------- build ----
FROM ${PYTHON_IMAGE} AS build

ARG MATURIN_VERSION=1.16.0
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# gcc provides the `cc` linker rustc needs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=rust /usr/local/rustup /usr/local/rustup
COPY --from=rust /usr/local/cargo /usr/local/cargo
RUN rustc --version && pip install --no-cache-dir "maturin==${MATURIN_VERSION}"

WORKDIR /src

# 1. Dependencies: the manifests, with stubs for the sources. bench/ is a
# member of the Cargo workspace: cargo needs its manifest to load the
# workspace, although only the server crate is built (bench/src stays a
# stub). The stub wheel's metadata gives the runtime dependencies, so that
# stage 2 installs them in a layer of their own too.
COPY Cargo.toml Cargo.lock pyproject.toml ./
COPY bench/Cargo.toml bench/
RUN mkdir -p rust bench/src python/signaling_sharded \
    && touch rust/lib.rs README.md python/signaling_sharded/__init__.py \
    && echo "fn main() {}" > bench/src/main.rs \
    && maturin build --release --locked --out /stub \
    && python -c "import glob, sys, zipfile; \
wheel = zipfile.ZipFile(glob.glob('/stub/*.whl')[0]); \
name = next(n for n in wheel.namelist() if n.endswith('.dist-info/METADATA')); \
lines = wheel.read(name).decode().splitlines(); \
sys.stdout.write(''.join(l.split(': ', 1)[1] + '\n' for l in lines if l.startswith('Requires-Dist: ')))" \
        > /requirements.txt \
    && cat /requirements.txt \
    && rm -rf /stub

# 2. The Rust sources. COPY keeps their modification times, which may be
# older than the stub's build: touch them so that cargo rebuilds the crate.
COPY rust/ rust/
RUN touch rust/*.rs && maturin build --release --locked --out /stub && rm -rf /stub

# 3. The Python package and the metadata's files: nothing to compile, cargo
# finds the crate up to date.
COPY README.md LICENSE ./
COPY python/ python/
RUN maturin build --release --locked --out /dist

# -------------------------------------------------------------- runtime ----
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The runtime dependencies first: this layer stays cached until they change.
COPY --from=build /requirements.txt /requirements.txt
RUN pip install --no-cache-dir -r /requirements.txt && rm /requirements.txt

COPY --from=build /dist/ /dist/
RUN pip install --no-cache-dir --no-deps /dist/*.whl \
    && rm -rf /dist

RUN useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin signaling

USER signaling

# The server listens on $PORT. Change the port through PORT rather than
# --port so that the health check below follows it.
ENV PORT=8081
EXPOSE 8081

# The slim image has no curl; urlopen raises (non-zero exit) on anything but 2xx.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8081'), timeout=4)"]

# SIGTERM (docker stop) drains: peers get close 1001 and the server exits
# once they are gone; its drain timeout (8 s) fits in docker's 10 s grace.
ENTRYPOINT ["signaling-sharded"]
CMD ["--host", "0.0.0.0"]
