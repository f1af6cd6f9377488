"""A throwaway `redis-server` on a free loopback port, for the cluster-mode tests.

Persistence is off, so a server that is killed and started again on the same
port comes back empty, as a Redis that lost its data would. The `redis_server`
fixture gives each test its own server; import it into the test module:
``from redis_server import redis_server  # noqa: F401``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import redis

from testkit.processes import RedisProcess


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
