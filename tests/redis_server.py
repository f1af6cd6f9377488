"""A throwaway `redis-server` on a free loopback port, for the cluster-mode tests.

Persistence is off, so a server that is killed and started again on the same
port comes back empty, as a Redis that lost its data would. The `redis_server`
fixture gives each test its own server; import it into the test module:
``from redis_server import redis_server  # noqa: F401``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import free_port

STARTUP_TIMEOUT = 10.0
"""Seconds for a started redis-server to answer PING."""
PORT_ATTEMPTS = 5
"""Free ports tried in turn, in case another process takes the one picked first."""


class RedisServer:
    """One `redis-server` process; `stop` kills it, `start` runs it again on the same port."""

    def __init__(
        self, executable: str, directory: Path, password: str | None = None, db: int = 0
    ) -> None:
        self.executable = executable
        self.directory = directory
        #: With a password, clients must AUTH (``--requirepass``).
        self.password = password
        self.db = db
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/{self.db}"

    def client(self) -> redis.Redis:
        """A new synchronous client, answers decoded as str."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            db=self.db,
            password=self.password,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=5,
        )

    def start(self) -> None:
        """Start the server on `port` and wait until it answers PING."""
        assert self.proc is None or self.proc.poll() is not None, "redis-server already runs"
        self.starts += 1
        log = self.directory / f"redis-{self.port}-{self.starts}.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    self.executable,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.directory),
                    "--daemonize",
                    "no",
                    "--logfile",
                    "",
                    *(["--requirepass", self.password] if self.password else []),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with self.client() as probe:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self.proc.returncode}:\n"
                        + log.read_text(errors="replace")
                    )
                try:
                    if probe.ping():
                        return
                except redis.exceptions.RedisError:
                    pass
                if time.monotonic() >= deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server not answering after {STARTUP_TIMEOUT} s:\n"
                        + log.read_text(errors="replace")
                    )
                time.sleep(0.02)

    def start_on_free_port(self) -> None:
        """`start`, on another free port if the one picked was taken meanwhile."""
        for attempt in range(PORT_ATTEMPTS):
            try:
                self.start()
                return
            except RuntimeError:
                if attempt == PORT_ATTEMPTS - 1:
                    raise
                self.port = free_port()

    def stop(self) -> None:
        """Kill the server (SIGKILL: no shutdown, no save) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def find_redis_server() -> str:
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return executable


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh, empty redis-server for one test, killed at its end."""
    server = RedisServer(find_redis_server(), tmp_path_factory.mktemp("redis"))
    server.start_on_free_port()
    yield server
    server.stop()
