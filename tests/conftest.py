"""Run the real server as a subprocess on a free loopback port.

`server` is one server per test module, started with default flags; tests that
need special flags use the `start_server` factory and get their own process.
When a test fails, the output of every running server is attached to its report.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from signaling_sharded._native import topic_owner
from wsclient import http_get

from testkit.processes import ServerProcess, free_port

EXECUTABLE = Path(sys.executable).parent / "signaling-sharded"
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
WORKERS = os.environ.get("SIGNALING_TEST_WORKERS", "1")
"""Worker processes of every test server unless a test asks otherwise."""

_running: list[Server] = []


class Server(ServerProcess):
    """A `signaling-sharded` process; its stdout and stderr go to files in *log_dir*."""

    def __init__(
        self,
        log_dir: Path,
        *args: str,
        executable: Path = EXECUTABLE,
        port: int | None = None,
        fd_limit: int | tuple[int, int] | None = None,
    ) -> None:
        """*fd_limit* caps the server's open descriptors (as ``ulimit -n`` would;
        a pair: the soft and the hard limit)."""
        if not executable.exists():
            pytest.fail(f"{executable} not found: run `make build` first")
        port = free_port() if port is None else port
        self.args = ("--host", "127.0.0.1", "--port", str(port), *args)
        stem = log_dir / f"server-{port}-{time.monotonic_ns()}"
        super().__init__(
            [str(executable), *self.args],
            port,
            stem.with_suffix(".out"),
            stderr_path=stem.with_suffix(".err"),
            fd_limit=fd_limit,
        )

    def url(self, topic: str, **query: str) -> str:
        """The WebSocket url of *topic*, percent-encoded, with optional query parameters."""
        url = f"ws://127.0.0.1:{self.port}/ws/{quote(topic, safe='')}"
        if query:
            url += "?" + urlencode(query, quote_via=quote)
        return url

    def status(self, path: str, headers: dict[str, str] | None = None) -> int:
        return http_get(self.port, path, headers).status

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        try:
            super().wait_ready(timeout)
        except RuntimeError as exc:
            pytest.fail(str(exc))

    def log_records(self) -> list[dict[str, Any]]:
        """Every line logged so far on stdout, each parsed as one JSON
        object; a last line still being written is left for a later call."""
        text = self.stdout_path.read_text()
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def records(self, msg: str, **fields: Any) -> list[dict[str, Any]]:
        """The records of *msg* with these *fields* logged so far, oldest first."""
        try:
            records = self.log_records()
        except ValueError:  # a line caught while being written: look again later
            return []
        return [
            record
            for record in records
            if record.get("msg") == msg
            and all(record.get(name) == value for name, value in fields.items())
        ]

    def wait_records(
        self, msg: str, count: int = 1, timeout: float = STARTUP_TIMEOUT, **fields: Any
    ) -> list[dict[str, Any]]:
        """Wait until at least *count* records of *msg* with these *fields* are logged.

        Returns every such record logged so far, oldest first.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.records(msg, **fields)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{count} x {msg!r} {fields} not logged within {timeout} s; got {len(found)}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then SIGKILL to the whole process group if it does not exit in time."""
        code = super().stop(timeout)
        if self in _running:
            _running.remove(self)
        return code


def topics_owned(workers: int, prefix: str) -> list[str]:
    """Topic names ``{prefix}-{n}``, one owned by each worker index of *workers*."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < workers:
        topic = f"{prefix}-{n}"
        found.setdefault(topic_owner(topic, workers), topic)
        n += 1
    return [found[index] for index in range(workers)]


def launch(log_dir: Path, *args: str, **options: Any) -> Server:
    """A started, healthy server; *options* go to `Server`."""
    server = Server(log_dir, *args, **options)
    _running.append(server)
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with default flags, shared by the tests of one module."""
    srv = launch(tmp_path_factory.mktemp("server"), "--workers", WORKERS)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.output(), srv.output()


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """A factory: ``start_server(*flags)`` runs a dedicated server with these flags."""
    started: list[Server] = []

    def start(*args: str, **options: Any) -> Server:
        if "--workers" not in args:
            args = ("--workers", WORKERS, *args)
        srv = launch(tmp_path_factory.mktemp("server"), *args, **options)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for srv in _running:
            report.sections.append((f"server on port {srv.port}", srv.output()[-20000:]))
    return report
