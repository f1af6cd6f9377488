"""routing: which worker serves a request, as the Rust reader reads it."""

from __future__ import annotations

from signaling_sharded._native import RequestReader, topic_owner
from signaling_sharded.server import routing

HEADERS = (
    "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def read(target: str, headers: str = HEADERS) -> object:
    request = RequestReader().read(f"GET {target} HTTP/1.1\r\n{headers}".encode())
    assert request is not None
    return request


def test_a_join_goes_to_the_owner_of_its_topic() -> None:
    for workers in (1, 2, 4, 7):
        for topic in ("room", "org/room", "café"):
            request = RequestReader().read(
                f"GET /ws/{topic.replace('/', '%2F')} HTTP/1.1\r\n{HEADERS}".encode()
            )
            assert request is not None and request.topic == topic
            assert routing.owner(request, workers, 0) == topic_owner(topic, workers)


def test_everything_else_stays_where_it_was_read() -> None:
    here = 3
    for request in (
        RequestReader().read(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
        RequestReader().read(b"GET /ws/room HTTP/1.1\r\nHost: x\r\n\r\n"),  # 426
        RequestReader().read(f"GET /ws/%FF HTTP/1.1\r\n{HEADERS}".encode()),  # 4400
        RequestReader().read(b"garbage\r\n\r\n"),
    ):
        assert request is not None
        assert routing.owner(request, 4, here) == here


def test_the_endpoints_are_the_static_files_and_the_checks() -> None:
    assert {"/", "/signaling.js"} == set(routing.STATIC_FILES)
    assert {"/healthz", "/readyz", "/metrics"} < routing.ENDPOINTS
