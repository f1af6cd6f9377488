"""webhooks: what a full queue drops, so that a receiver never hears of a
peer whose join it did not get."""

from __future__ import annotations

from signaling_sharded.server import webhooks


def event(kind: str, peer: str) -> webhooks.Event:
    key = f"p{peer}"
    return webhooks.Event(
        kind.encode(),
        key if kind == "peer.joined" else None,
        key if kind == "peer.left" else None,
        key if kind == "peer.updated" else None,
    )


def test_what_follows_a_dropped_join_is_dropped_too() -> None:
    sender = webhooks.Sender("http://receiver.example/", limit=1)
    assert sender.put(event("peer.joined", "A"))
    assert not sender.put(event("peer.joined", "B")), "the queue is full"
    sender.queue.clear()  # sent
    assert not sender.put(event("peer.updated", "B")), "its join was dropped"
    assert sender.put(event("peer.updated", "A"))
    sender.queue.clear()
    assert not sender.put(event("peer.left", "B")), "its join was dropped"
    assert sender.dropped == set(), "forgotten with its end"
    assert sender.put(event("peer.left", "A"))
