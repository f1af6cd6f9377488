"""Raw Redis connections: commands written as RESP, replies parsed by hiredis.

The cluster's two hot connections (the writer and the inbox) are set up with
:class:`Link` and then handed over to the Rust core (:meth:`Link.hand_over`);
its short calls to Sentinels use it throughout. redis-py's per-command
machinery cost more than everything else a relay between nodes does.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

#: Seconds a Redis command may take before the connection is deemed lost.
COMMAND_TIMEOUT = 5.0


class Link(asyncio.Protocol):
    """A raw Redis connection: commands written as encoded, replies parsed
    by hiredis and handed over in batches, until another protocol takes the
    connection over (:meth:`hand_over`)."""

    def __init__(self, on_replies: Callable[[list[Any]], None]) -> None:
        self.on_replies = on_replies
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(
        cls, url: str, on_replies: Callable[[list[Any]], None], *, db: bool = True
    ) -> Link:
        """Connects to the Redis of ``url``, with its password and (``db``)
        database; ``rediss://`` uses TLS."""
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        loop = asyncio.get_running_loop()
        tls = ssl.create_default_context() if "connection_class" in options else None
        host, port = options.get("host", "localhost"), options.get("port", 6379)
        _, link = await asyncio.wait_for(
            loop.create_connection(lambda: cls(on_replies), host, port, ssl=tls),
            COMMAND_TIMEOUT,
        )
        setup = []
        if options.get("password") is not None:
            credentials = [options.get("username"), options["password"]]
            setup.append(command("AUTH", *[c for c in credentials if c is not None]))
        if db and options.get("db"):
            setup.append(command("SELECT", options["db"]))
        try:
            if setup:
                await link.call(setup)
        except BaseException:
            link.close()
            raise
        return link

    async def call(self, commands: list[bytes]) -> list[Any]:
        """Sends ``commands`` and waits for their replies (setup only:
        nothing else may be in flight)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Any]] = loop.create_future()
        replies: list[Any] = []

        def collect(batch: list[Any]) -> None:
            replies.extend(batch)
            if len(replies) >= len(commands) and not done.done():
                done.set_result(replies)

        self.on_replies, keep = collect, self.on_replies
        try:
            self.write(b"".join(commands))
            result = await asyncio.wait_for(done, COMMAND_TIMEOUT)
        finally:
            self.on_replies = keep
        for reply in result:
            if isinstance(reply, hiredis.ReplyError):
                raise RedisError(str(reply))
        return result

    def hand_over(self, make: Callable[[asyncio.Transport], object]) -> None:
        """From now on the protocol ``make(transport)`` reads the connection
        (the Rust core's); this link still writes, closes, and learns of
        its loss through ``connection_lost``, which that protocol calls."""
        assert self.transport is not None
        self.transport.set_protocol(cast(asyncio.BaseProtocol, make(self.transport)))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        replies = []
        while (reply := self.reader.gets()) is not False:
            replies.append(reply)
        if replies:
            self.on_replies(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise RedisConnectionError("the connection to Redis is closed")
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def command(*parts: str | bytes | int) -> bytes:
    """A Redis command, RESP-encoded."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
