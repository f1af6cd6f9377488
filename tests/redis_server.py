"""A throwaway `redis-server` on a free loopback port, for the cluster-mode tests.

Persistence is off, so a server that is killed and started again on the same
port comes back empty, as a Redis that lost its data would. The `redis_server`
fixture gives each test its own server; import it into the test module:
``from redis_server import redis_server  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from testkit.processes import RedisProcess, wait_until


class RedisServer(RedisProcess):
    """One `redis-server` process; `stop` kills it, `start` runs it again on the same port."""

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


class SentinelServer(RedisServer):
    """One Redis Sentinel watching `master` as service `SERVICE`: it deems the
    master down after a second without an answer and fails over alone
    (quorum 1). With a password, clients of the Sentinel must AUTH too.
    `client`, `running` and `stop` are a Redis server's."""

    SERVICE = "signaling"

    def __init__(
        self, executable: str, directory: Path, master: RedisServer, password: str | None = None
    ) -> None:
        super().__init__(executable, directory, password=password)
        self.master = master

    @property
    def url(self) -> str:
        """The servers' ``--redis``: the service's master through this Sentinel,
        with the master's password and database."""
        credentials = f":{self.master.password}@" if self.master.password else ""
        query = f"?sentinel_password={self.password}" if self.password else ""
        return (
            f"redis+sentinel://{credentials}127.0.0.1:{self.port}/{self.SERVICE}/"
            f"{self.master.db}{query}"
        )

    def start(self, timeout: float = 20.0, replicas: int = 1) -> None:
        """Start it and wait until it knows ``replicas`` replicas in sync."""
        service = self.SERVICE
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.directory}",
            f"sentinel monitor {service} 127.0.0.1 {self.master.port} 1",
            f"sentinel down-after-milliseconds {service} 1000",
            f"sentinel failover-timeout {service} 10000",
        ]
        if self.master.password:
            lines.append(f"sentinel auth-pass {service} {self.master.password}")
        if self.password:
            lines.append(f"requirepass {self.password}")
        config = self.directory / f"sentinel-{self.port}.conf"
        config.write_text("\n".join(lines) + "\n")
        log = self.directory / f"sentinel-{self.port}.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [self.executable, str(config), "--sentinel"],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def synced() -> bool:
            with contextlib.suppress(redis.RedisError), self.client() as client:
                known = [r for r in client.sentinel_slaves(service) if not r["is_sdown"]]
                return len(known) >= replicas and all(
                    r["master-link-status"] == "ok" for r in known
                )
            return False

        if not wait_until(synced, self.running, timeout):
            self.stop()
            raise RuntimeError(
                f"the Sentinel did not see {replicas} replicas within {timeout:g} s:\n"
                + log.read_text(errors="replace")
            )

    def master_port(self) -> int:
        """The port of the master the Sentinel names now."""
        with self.client() as client:
            _, port = client.sentinel_get_master_addr_by_name(self.SERVICE)
            return int(port)


@pytest.fixture
def sentinel_set(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RedisServer, RedisServer, SentinelServer]]:
    """A master, its replica and a Sentinel watching them, all with
    passwords; killed at the test's end."""
    executable = find_redis_server()
    directory = tmp_path_factory.mktemp("sentinel")
    master = RedisServer(executable, directory, password="master-pw")
    master.start_on_free_port()
    replica = RedisServer(executable, directory, password="master-pw", replica_of=master.port)
    watcher = SentinelServer(executable, directory, master, password="sentinel-pw")
    try:
        replica.start_on_free_port()
        watcher.start()
        yield master, replica, watcher
    finally:
        watcher.stop()
        replica.stop()
        master.stop()
