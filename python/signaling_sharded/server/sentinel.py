"""Cluster mode behind Redis Sentinel: where the master is now.

``--redis redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``
names the Sentinels (port 26379 unless given), the service (the master's
name in their ``sentinel monitor``) and the master's database; the
credentials are the master's and its replicas'. Sentinels that require a
password of their own (``requirepass`` in sentinel.conf) get it from the
query: ``?sentinel_password=...`` (and ``sentinel_username=...``).

A node asks the Sentinels in turn for the master's address; the first that
answers goes to the front of the list, as the Sentinel client guidelines
advise (https://redis.io/docs/latest/develop/reference/sentinel-clients/).
It then connects there, and the cluster checks with ``HELLO`` (its
``role``) that it found a master: a Sentinel's answer can lag a failover by
a moment. While connected,
the node listens to a Sentinel's ``+switch-master`` and moves at once when
the master does. Without that, a node would stay on a demoted master until
Sentinel reconfigures it, which it does only once the old master has said it
is a master for about 8 s (and not at all while it cannot reach it).

This module parses and finds; :mod:`.cluster` connects and recovers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from signaling_sharded.server.resp import COMMAND_TIMEOUT, Link, command, text

SCHEME = "redis+sentinel"
DEFAULT_PORT = 26379
#: What the query may set.
OPTIONS = ("sentinel_username", "sentinel_password")
#: Seconds between attempts to reach a Sentinel to listen to, when none answers.
RETRY = 1.0
#: Seconds between PINGs on the connection that listens: a Sentinel that
#: hangs (or a connection silently cut) is left after this and the command
#: timeout without an answer.
LISTEN_PING = 5.0


@dataclass
class Sentinels:
    """A ``redis+sentinel://`` URL, read."""

    #: (host, port) of each Sentinel; the last one that answered first.
    addresses: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    def master_url(self, host: str, port: int) -> str:
        """The ``redis://`` URL of the master at ``host:port``."""
        return url_of(host, port, self.username, self.password, self.db)

    def sentinel_url(self, host: str, port: int) -> str:
        return url_of(
            host, port, self.options.get("sentinel_username"), self.options.get("sentinel_password")
        )

    async def master(self) -> tuple[str, int]:
        """The master's address, from the first Sentinel that knows it."""
        failures = []
        for index, (host, port) in enumerate(self.addresses):
            try:
                link = await Link.open(self.sentinel_url(host, port), ignore, db=False)
                try:
                    (reply,) = await link.call(
                        [command("SENTINEL", "get-master-addr-by-name", self.service)]
                    )
                finally:
                    link.close()
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                failures.append(f"{address(host, port)}: {exc or type(exc).__name__}")
                continue
            if reply is None:
                failures.append(f"{address(host, port)} does not monitor {self.service!r}")
                continue
            self.addresses.insert(0, self.addresses.pop(index))
            return text(reply[0]), int(reply[1])
        raise RedisConnectionError("no Sentinel named the master: " + "; ".join(failures))

    async def moved(self, master: tuple[str, int]) -> str:
        """Returns where the master went once a Sentinel announces that it
        left ``master``. Sentinels that fail are left for the next; while
        none answers, this keeps trying (the master may be fine)."""
        while True:
            for host, port in list(self.addresses):
                try:
                    where = await self.listen(host, port, master)
                except (RedisError, OSError, asyncio.TimeoutError):
                    continue
                if where is not None:
                    return where
            await asyncio.sleep(RETRY)

    async def listen(self, host: str, port: int, master: tuple[str, int]) -> str | None:
        """Where the master went, heard from this Sentinel; None if its
        connection was lost first."""
        loop = asyncio.get_running_loop()
        subscribed: asyncio.Future[None] = loop.create_future()
        moved: asyncio.Future[str] = loop.create_future()
        heard = loop.time()

        def on_replies(replies: list[Any]) -> None:
            nonlocal heard
            heard = loop.time()
            for reply in replies:
                if not isinstance(reply, list) or not reply:
                    continue  # an error: the PINGs tell whether it still works
                if reply[0] == b"subscribe" and not subscribed.done():
                    subscribed.set_result(None)
                elif reply[0] == b"message" and len(reply) == 3 and not moved.done():
                    where = read_switch(reply[2])
                    if where is not None and where[0] == self.service and where[1] != master:
                        moved.set_result(address(*where[1]))

        link = await Link.open(self.sentinel_url(host, port), on_replies, db=False)
        try:
            link.write(command("SUBSCRIBE", "+switch-master"))
            await asyncio.wait_for(subscribed, COMMAND_TIMEOUT)
            # A switch before the subscription would go unheard: ask once.
            now = await self.master()
            if now != master:
                return address(*now)
            either: list[asyncio.Future[Any]] = [moved, link.lost]
            while not any(future.done() for future in either):
                if loop.time() - heard > LISTEN_PING + COMMAND_TIMEOUT:
                    return None  # it stopped answering
                link.write(command("PING"))
                await asyncio.wait(either, timeout=LISTEN_PING, return_when=asyncio.FIRST_COMPLETED)
            return moved.result() if moved.done() else None
        finally:
            link.close()


def read_switch(message: bytes) -> tuple[str, tuple[str, int]] | None:
    """``+switch-master``'s ``service old-host old-port new-host new-port``:
    the service and its new address; None if it is not that."""
    parts = message.split()
    if len(parts) != 5 or not parts[4].isdigit():
        return None
    return text(parts[0]), (text(parts[3]), int(parts[4]))


def is_sentinel_url(url: str) -> bool:
    return url.lower().startswith(SCHEME + "://")


def parse(url: str) -> Sentinels:
    """Reads a ``redis+sentinel://`` URL; ValueError says what is wrong."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("the URL does not parse (an IPv6 address without its ']'?)") from None
    if parts.scheme.lower() != SCHEME:
        raise ValueError(f"the scheme must be {SCHEME}://")
    if parts.fragment:
        raise ValueError("a Sentinel URL has no #fragment")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    addresses = [read_address(item) for item in hosts.split(",")]
    path = [segment for segment in parts.path.split("/") if segment]
    if not path:
        raise ValueError("the service name is missing (redis+sentinel://host:26379/mymaster)")
    if len(path) > 2:
        raise ValueError("the path is /service or /service/db")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ValueError("the database must be a number")
        db = int(path[1])
    options: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key not in OPTIONS:
            raise ValueError(f"unknown option {key!r} (known: {', '.join(OPTIONS)})")
        options[key] = value
    return Sentinels(addresses, unquote(path[0]), db, username, password, options)


def read_address(item: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port``."""
    if item.startswith("["):
        host, bracket, rest = item[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("an IPv6 Sentinel address is not [address]:port")
        port = rest[1:]
    else:
        host, _, port = item.partition(":")
    # Not repeated in the errors: a mistyped URL may have its password here.
    if not host:
        raise ValueError("a Sentinel's address is empty")
    if not port:
        return host, DEFAULT_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("a Sentinel's port is not a number from 1 to 65535")
    return host, int(port)


def url_of(
    host: str, port: int, username: str | None, password: str | None, db: int | None = None
) -> str:
    credentials = ""
    if password is not None:
        credentials = f"{quote(username or '', safe='')}:{quote(password, safe='')}@"
    elif username is not None:
        credentials = f"{quote(username, safe='')}@"
    path = "" if db is None else f"/{db}"
    return f"redis://{credentials}{address(host, port)}{path}"


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ignore(replies: list[Any]) -> None:
    """Replies nothing waits for (there are none outside ``Link.call``)."""
