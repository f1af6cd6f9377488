"""The admin API (PROTOCOL.md section 10): the application's backend sees
and steers the sessions, under ``/admin/v1``.

Off unless ``--admin-token`` is set; every request needs ``Authorization:
Bearer <token>`` (compared in constant time), else 401. A request about
one topic (``/admin/v1/topics/{topic}/...``) is routed like a join, to the
topic's owner, which answers from its hub. The topic listing is the whole
server's: the worker that took it asks every other worker for its own
(:func:`worker_request`, over a socket pair handed to it as a connection)
and merges them.

In cluster mode the same requests are answered for the whole cluster: the
listing comes from Redis, and an action about a topic is carried out by
every node holding its peers (or the one holding the peer), whose answers
are merged (:func:`merged`).

This module turns requests into answers; it does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from signaling_sharded._native import Hub, Request, query_values

PREFIX = "/admin/v1/"
TOPICS = "/admin/v1/topics"
#: Query of the listing one worker gives another: its own topics, all of them.
WORKER_SCOPE = "scope=worker"
#: Topics per page of the listing: by default, and at most.
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
#: Largest request body read, in bytes (a message's payload).
MAX_BODY = 64 * 1024
JSON_CONTENT_TYPE = "application/json"
#: Tells a client it may try again (a 503's).
RETRY_AFTER = ("Retry-After", "1")


@dataclass
class Answer:
    """An admin response: status, JSON body (None: none), extra headers."""

    status: int
    body: Any = None
    headers: list[tuple[str, str]] = field(default_factory=list)

    def encoded(self) -> bytes:
        if self.body is None:
            return b""
        return json.dumps(self.body, separators=(",", ":"), ensure_ascii=False).encode()


def error(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> Answer:
    return Answer(status, {"error": message}, list(headers))


def unavailable(message: str) -> Answer:
    return error(503, message, [RETRY_AFTER])


def is_admin(path: str) -> bool:
    return path == TOPICS or path.startswith(PREFIX)


def authorized(token: str, authorization: str | None) -> bool:
    """Whether the ``Authorization`` header carries ``token``, compared in
    constant time."""
    if authorization is None:
        return False
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


UNAUTHORIZED = error(401, "missing or wrong admin token", [("WWW-Authenticate", "Bearer")])


def since(millis: int) -> str:
    """RFC 3339 with milliseconds, UTC."""
    moment = dt.datetime.fromtimestamp(millis / 1000, dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{millis % 1000:03d}Z"


@dataclass(frozen=True)
class Peers:
    """List the peers of ``topic``."""

    topic: str


@dataclass(frozen=True)
class Kick:
    """Remove ``peer`` from ``topic``."""

    topic: str
    peer: str


@dataclass(frozen=True)
class Message:
    """Send a ``server-message`` with ``payload`` (JSON text) to ``to``, or
    to every peer of ``topic``."""

    topic: str
    payload: str
    to: str | None = None


#: What a request under ``/admin/v1/topics/{topic}`` asks.
Action = Peers | Kick | Message


def read_action(request: Request, body: bytes) -> Action | Answer:
    """What a request under ``/admin/v1/topics/{topic}`` asks, or the
    answer it gets at once (400, 404, 405)."""
    rest, topic, method = request.admin, request.topic, request.method
    assert rest is not None
    if topic is None:
        return error(400, "invalid topic")
    if rest == "/peers":
        if method not in ("GET", "HEAD"):
            return error(405, "method not allowed", [("Allow", "GET, HEAD")])
        return Peers(topic)
    if rest.startswith("/peers/") and rest.count("/") == 2:
        if method != "DELETE":
            return error(405, "method not allowed", [("Allow", "DELETE")])
        return Kick(topic, rest.removeprefix("/peers/"))
    if rest == "/messages":
        if method != "POST":
            return error(405, "method not allowed", [("Allow", "POST")])
        return read_message(topic, body)
    return error(404, "not found")


def read_message(topic: str, body: bytes) -> Message | Answer:
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return error(400, "the body is not JSON")
    if not isinstance(message, dict) or "payload" not in message:
        return error(400, 'the body must be an object with "payload"')
    to = message.get("to")
    if to is not None and not isinstance(to, str):
        return error(400, '"to" must be a peer id')
    payload = json.dumps(message["payload"], separators=(",", ":"), ensure_ascii=False)
    return Message(topic, payload, to)


def peer_of(action: Action) -> str | None:
    """The one peer ``action`` concerns, if it concerns one."""
    if isinstance(action, Kick):
        return action.peer
    if isinstance(action, Message):
        return action.to
    return None


def act(hub: Hub, action: Action) -> Answer:
    """Carries out ``action`` on this worker's peers."""
    if isinstance(action, Peers):
        peers = hub.admin_peers(action.topic)
        if peers is None:
            return error(404, "unknown topic")
        return Answer(200, {"peers": [peer_entry(*peer) for peer in peers]})
    if isinstance(action, Kick):
        missing = hub.kick(action.topic, action.peer)
        if missing is not None:
            return error(404, f"unknown {missing}")
        return Answer(204)
    reached, missing = hub.server_message(action.topic, action.payload, action.to)
    if missing is not None:
        return error(404, f"unknown {missing}")
    return Answer(202, {"reached": reached})


def peer_entry(peer: str, metadata: str | None, joined: int, suspended: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": peer}
    if metadata is not None:
        entry["metadata"] = json.loads(metadata)
    entry["since"] = since(joined)
    entry["suspended"] = suspended
    return entry


def action_to_json(action: Action) -> dict[str, Any]:
    """``action`` as one node asks it of another (cluster mode)."""
    if isinstance(action, Peers):
        return {"op": "peers", "topic": action.topic}
    if isinstance(action, Kick):
        return {"op": "kick", "topic": action.topic, "peer": action.peer}
    return {"op": "message", "topic": action.topic, "payload": action.payload, "to": action.to}


def action_from_json(asked: dict[str, Any]) -> Action | None:
    """The action another node asked (:func:`action_to_json`)."""
    try:
        op, topic = asked["op"], asked["topic"]
        if op == "peers":
            return Peers(topic)
        if op == "kick":
            return Kick(topic, asked["peer"])
        if op == "message":
            return Message(topic, asked["payload"], asked["to"])
    except (KeyError, TypeError):
        pass
    return None


def merged(action: Action, answers: list[Answer]) -> Answer:
    """The answer to ``action`` from the answers of the nodes that hold
    the topic's peers (cluster mode): the peers of all, the messages
    reached by all; 404 if none had what was asked."""
    found = [answer for answer in answers if answer.status != 404]
    if not found:
        return answers[0] if answers else error(404, "unknown topic")
    if isinstance(action, Peers):
        peers = [peer for answer in found for peer in answer.body["peers"]]
        return Answer(200, {"peers": sorted(peers, key=lambda peer: peer["id"])})
    if isinstance(action, Message) and action.to is None:
        return Answer(202, {"reached": sum(answer.body["reached"] for answer in found)})
    return found[0]


@dataclass(frozen=True)
class Listing:
    """What a topic listing asks for."""

    prefix: str
    limit: int
    after: str | None
    #: Only this worker's topics, all of them (for the worker that merges).
    worker_only: bool


def read_listing(request: Request) -> Listing | Answer:
    """The listing ``request`` asks for, or the 400 or 405 it gets."""
    if request.method not in ("GET", "HEAD"):
        return error(405, "method not allowed", [("Allow", "GET, HEAD")])
    values = query_values(request.query)
    if values is None:
        return error(400, "invalid query")
    try:
        limit = int(values.get("limit", DEFAULT_LIMIT))
    except ValueError:
        return error(400, "limit must be a number")
    if not 1 <= limit <= MAX_LIMIT:
        return error(400, f"limit must be 1 to {MAX_LIMIT}")
    after = None
    if values.get("cursor"):
        after = decode_cursor(values["cursor"])
        if after is None:
            return error(400, "invalid cursor")
    worker_only = values.get("scope") == "worker"
    return Listing(values.get("prefix", ""), limit, after, worker_only)


def topics_page(listing: Listing, topics: Iterable[tuple[str, int]]) -> Answer:
    """One page of ``topics`` (every worker's), in order of name."""
    if listing.worker_only:
        return Answer(200, {"topics": [{"topic": t, "peers": n} for t, n in topics]})
    chosen = sorted(
        (topic, peers)
        for topic, peers in topics
        if topic.startswith(listing.prefix) and (listing.after is None or topic > listing.after)
    )
    page = chosen[: listing.limit]
    cursor = encode_cursor(page[-1][0]) if len(chosen) > listing.limit else None
    return Answer(200, {"topics": [{"topic": t, "peers": n} for t, n in page], "cursor": cursor})


def worker_topics(answer: bytes) -> list[tuple[str, int]] | None:
    """The topics in another worker's answer to :func:`worker_request`."""
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        return None
    try:
        return [(entry["topic"], entry["peers"]) for entry in json.loads(body)["topics"]]
    except (ValueError, KeyError, TypeError):
        return None


def worker_request(authorization: str) -> bytes:
    """The request that asks another worker for its own topics, with the
    client's own credentials."""
    return (
        f"GET {TOPICS}?{WORKER_SCOPE} HTTP/1.1\r\nHost: worker\r\n"
        f"Authorization: {authorization}\r\n\r\n"
    ).encode()


def encode_cursor(topic: str) -> str:
    return base64.urlsafe_b64encode(topic.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str | None:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
