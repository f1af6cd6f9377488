"""cluster: the RESP commands and replies of the Redis link."""

from __future__ import annotations

from signaling_sharded.server import cluster


def test_commands_are_resp() -> None:
    assert cluster.command("PING") == b"*1\r\n$4\r\nPING\r\n"
    assert cluster.command("SET", "k", 7, b"\x00v") == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n7\r\n$2\r\n\x00v\r\n"
    )


def test_a_change_then_a_snapshot() -> None:
    # Version 42 (from 40: three events), opened, not closed, one left
    # (X of node n9), two joined; then two members (and a torn triple).
    change = [42, 40, 1, 0, 1, b"X", b"n9", 2, b"J1", b"J2"]
    members = [b"P1", b"n1", b"", b"P2", b"n2", b'{"a":1}', b"x", b"y"]
    read, at = cluster.read_change([*change, *members])
    assert read == cluster.Change(42, 40, True, False, [("X", "n9")], ["J1", "J2"])
    assert at == len(change)
    assert cluster.snapshot([*change, *members], at) == [
        ("P1", "n1", None),
        ("P2", "n2", '{"a":1}'),
    ]


def test_which_ops_wait_for_a_snapshot() -> None:
    assert cluster.wants_snapshot(cluster.SyncOp("t", [])) == "t"
    assert cluster.wants_snapshot(cluster.TouchOp("t", [])) is None
    assert cluster.wants_snapshot(cluster.ReadyOp()) is None
