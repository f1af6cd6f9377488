"""Reading ``redis+sentinel://`` URLs (the cluster's Sentinel mode)."""

from __future__ import annotations

import argparse
import re

import pytest
from redis.connection import parse_url
from signaling_sharded.server import cli, sentinel


def test_a_full_url() -> None:
    found = sentinel.parse(
        "redis+sentinel://app:p%40ss@10.0.0.1,10.0.0.2:26380,[fd00::3]:26381/cache/2"
        "?sentinel_password=s%26cret"
    )
    assert found.addresses == [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("fd00::3", 26381)]
    assert (found.service, found.db, found.username, found.password) == ("cache", 2, "app", "p@ss")
    assert found.options == {"sentinel_password": "s&cret"}
    # What the node connects to: redis-py reads back exactly these.
    master = parse_url(found.master_url("fd00::9", 6380))
    assert (master["host"], master["port"], master["db"]) == ("fd00::9", 6380, 2)
    assert (master["username"], master["password"]) == ("app", "p@ss")
    sentinel_side = parse_url(found.sentinel_url("10.0.0.1", 26379))
    assert (sentinel_side.get("username"), sentinel_side["password"]) == (None, "s&cret")
    assert "db" not in sentinel_side


def test_the_least_url() -> None:
    found = sentinel.parse("redis+sentinel://sentinel/mymaster")
    assert (found.addresses, found.service, found.db) == ([("sentinel", 26379)], "mymaster", 0)
    assert found.password is None and found.master_url("h", 1) == "redis://h:1/0"
    assert found.sentinel_url("sentinel", 26379) == "redis://sentinel:26379"
    # A password alone, as Redis before ACLs knew it.
    assert sentinel.parse("redis+sentinel://:pw@s/m").master_url("h", 1) == "redis://:pw@h:1/0"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://s:26379", "service name is missing"),
        ("redis+sentinel://s:26379/", "service name is missing"),
        ("redis+sentinel://s/m/0/extra", "/service or /service/db"),
        ("redis+sentinel://s/m/zero", "must be a number"),
        ("redis+sentinel://s:http/m", "port is not a number"),
        ("redis+sentinel://s:70000/m", "port is not a number"),
        ("redis+sentinel://s,,t/m", "empty"),
        ("redis+sentinel://[fd00::1/m", "does not parse"),
        ("redis+sentinel://s/m?ssl=true", "unknown option 'ssl'"),
        ("redis+sentinel://s/m#x", "fragment"),
    ],
)
def test_what_is_wrong_is_said(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        sentinel.parse(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:hunter2@s:99999/m",
        "redis+sentinel://u:hunter2/m",  # the @ forgotten: the password is a port
        "redis+sentinel://:hunter2/m",
        "redis://:hunter2/0",
        "redis://u:hunter2@[::1/0",
    ],
)
def test_the_usage_error_does_not_repeat_the_password(url: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        cli.redis_url(url)
    assert "hunter2" not in str(refused.value), refused.value


def test_switch_messages() -> None:
    assert sentinel.read_switch(b"cache 10.0.0.1 6379 10.0.0.2 6380") == (
        "cache",
        ("10.0.0.2", 6380),
    )
    assert sentinel.read_switch(b"cache 10.0.0.1 6379") is None
    assert sentinel.read_switch(b"cache a b c port") is None
