# signaling-sharded container image.
#
#   docker build -t signaling-sharded .
#   docker run --rm -p 8081:8081 signaling-sharded
#
# Stage 1 builds the wheel (Rust core + Python package) with maturin; stage 2
# installs that wheel into a clean Python image, the same way `pip install .`
# does, so the image carries no compiler and no source tree.

# ---------------------------------------------------------------- build ----
FROM python:3.12-slim AS build

ARG RUST_TOOLCHAIN=stable
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# gcc provides the `cc` linker rustc needs; curl fetches rustup.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
        | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "$RUST_TOOLCHAIN" \
    && rustc --version

RUN pip install --no-cache-dir "maturin>=1.8,<2"

WORKDIR /src
# bench/ is a member of the Cargo workspace: cargo needs its manifest to load
# the workspace, although only the server crate is built.
COPY Cargo.toml Cargo.lock pyproject.toml README.md ./
COPY rust/ rust/
COPY bench/ bench/
COPY python/ python/

RUN maturin build --release --locked --out /dist

# -------------------------------------------------------------- runtime ----
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

COPY --from=build /dist/ /dist/
RUN pip install --no-cache-dir /dist/*.whl \
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
