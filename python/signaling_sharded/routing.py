"""What an HTTP request asks for: pure functions, no sockets.

``route(target)`` maps a request target (path and query, as sent) to a
:class:`Join` for ``/ws/{topic}``, an :class:`Endpoint` for the plain HTTP
paths, or a :class:`Refusal` with the HTTP status the client gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union
from urllib.parse import parse_qs, unquote_to_bytes

from signaling_sharded._native import parse_metadata

#: Longest topic, in bytes of UTF-8 once percent-decoded.
MAX_TOPIC_BYTES = 256
#: Longest ``metadata`` query value, in bytes once percent-decoded.
MAX_METADATA_BYTES = 1024

WS_PREFIX = "/ws/"
#: Files of the browser demo, served from the package's ``static`` folder.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/signaling.js": ("signaling.js", "text/javascript; charset=utf-8"),
}
ENDPOINTS = frozenset({"/healthz", "/readyz", "/metrics", *STATIC_FILES})


@dataclass(frozen=True)
class Join:
    """An upgrade to join ``topic``; ``metadata`` is JSON text or None;
    ``token`` is the ``token`` query parameter, if any."""

    topic: str
    metadata: str | None
    token: str | None = None


@dataclass(frozen=True)
class Endpoint:
    path: str


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str


Route = Union[Join, Endpoint, Refusal]


def route(target: str) -> Route:
    path, _, query = target.partition("?")
    if path in ENDPOINTS:
        return Endpoint(path)
    if not path.startswith(WS_PREFIX):
        return Refusal(404, "not found")
    topic = parse_topic(path[len(WS_PREFIX) :])
    if topic is None:
        return Refusal(400, "invalid topic: 1 to 256 bytes of UTF-8, without '/'")
    try:
        params = parse_qs(query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        return Refusal(400, "invalid query: not UTF-8")
    token = params["token"][0] if "token" in params else None
    if "metadata" not in params:
        return Join(topic, None, token)
    metadata = params["metadata"][0]
    if len(metadata.encode()) > MAX_METADATA_BYTES:
        return Refusal(400, "invalid metadata: over 1 KiB")
    parsed = parse_metadata(metadata)
    if parsed is None:
        return Refusal(400, "invalid metadata: not JSON")
    return Join(topic, parsed, token)


def parse_topic(segment: str) -> str | None:
    """The percent-decoded topic of a ``/ws/`` path segment, or None."""
    if "/" in segment:
        return None
    raw = unquote_to_bytes(segment)
    if not 1 <= len(raw) <= MAX_TOPIC_BYTES:
        return None
    try:
        topic = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "/" in topic else topic


#: Longest request line routed by peeking; a longer one is answered (414)
#: by the worker that accepted it.
MAX_REQUEST_LINE = 8192


class Incomplete:
    """The request line has not fully arrived yet."""


INCOMPLETE = Incomplete()


def topic_of_request(peeked: bytes) -> str | Incomplete | None:
    """The topic a request joins, from the first bytes of the connection.

    Returns the topic for ``GET /ws/{topic}``, ``None`` when the request is
    anything else (a plain HTTP path, a bad topic, garbage: the worker that
    accepted it answers), or ``INCOMPLETE`` while the request line has not
    arrived in full.
    """
    end = peeked.find(b"\r\n")
    if end < 0:
        return INCOMPLETE if len(peeked) < MAX_REQUEST_LINE else None
    parts = peeked[:end].split(b" ")
    if len(parts) != 3:
        return None
    try:
        target = parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None
    path = target.partition("?")[0]
    if not path.startswith(WS_PREFIX):
        return None
    return parse_topic(path[len(WS_PREFIX) :])
