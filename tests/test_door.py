"""The door of the server: how a request is read, routed, answered or upgraded, and
a few frame rules right behind it.

- Routing has one reading of a request: whatever its shape (leading empty lines,
  bare LF line ends, raw UTF-8 in the path, header names in any case, an
  absolute-form target), a join is upgraded by the worker that owns its topic
  (``X-Signaling-Worker`` is ``topic_owner(topic, N)``) and lands in the topic a
  canonical request for it joins; the same holds under ``--max-peers-per-topic``.
- Topic rules: ``%2F`` is part of a topic while an unencoded ``/`` is another
  path (404); a valid upgrade with an invalid topic or metadata is upgraded,
  then refused with ``invalid_topic`` or ``invalid_metadata`` and close 4400;
  without upgrade headers it gets 426.
- Plain HTTP answers (400, 403, 405, 414, 426, 431, 505), each naming the
  worker that gave it in ``X-Signaling-Worker``.
- Frames: a 64-bit length with its top bit set, the limit of 1024 frames per
  message, WebSocket pings under ``--rate-limit``, a lone surrogate escape in ``to``.
- A property test over generated request shapes against four workers.

Requests are hand-written bytes over loopback sockets, since their shape is the
point; every server here gives a client 2 s to send its request, so a request
the server cannot read ends in a closed connection instead of a long wait.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import hypothesis.strategies as st
import pytest
from conftest import Server, launch
from hypothesis import Phase, given, settings
from signaling_sharded._native import topic_owner
from wsclient import (
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    TIMEOUT,
    ULID,
    WS_GUID,
    RawClient,
    Response,
    close_code_of,
    encode_frame,
    websocket_headers,
)

CRLF, LF = b"\r\n", b"\n"
WORKER_HEADER = "x-signaling-worker"
HANDSHAKE_TIMEOUT = "2"
"""Seconds every server here gives a client to send its request."""
ALLOWED_ORIGIN = "https://a.example"
CLOSE_INVALID = 4400
ATTEMPTS = 8
"""Topics tried per request shape: enough that a join mis-routed by chance shows."""


# --- servers --------------------------------------------------------------------


def start_door(tmp_path_factory: pytest.TempPathFactory, workers: int, *flags: str) -> Server:
    srv = launch(
        tmp_path_factory.mktemp("server"),
        "--workers",
        str(workers),
        "--handshake-timeout",
        HANDSHAKE_TIMEOUT,
        *flags,
    )
    srv.wait_records("listening", count=workers)
    return srv


def workers_of(srv: Server) -> int:
    return int(srv.args[srv.args.index("--workers") + 1])


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda n: f"{n}-workers")
def door(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server per worker count, each with an Origin allow-list; tests pick
    their worker counts with `on_workers`."""
    srv = start_door(tmp_path_factory, request.param, "--allowed-origin", ALLOWED_ORIGIN)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.output(), srv.output()


def on_workers(*counts: int) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        "door", counts, indirect=True, ids=[f"{n}-workers" for n in counts]
    )


# --- requests -------------------------------------------------------------------


def build_request(
    target: str | bytes,
    headers: Sequence[tuple[str, str]],
    *,
    method: str = "GET",
    version: str = "HTTP/1.1",
    leading: bytes = b"",
    eols: Sequence[bytes] | None = None,
) -> bytes:
    """A request head: *leading*, the request line, *headers* in this order and
    the blank line; line i ends with ``eols[i]`` (CRLF for every line by default)."""
    if isinstance(target, str):
        target = target.encode()
    lines = [method.encode() + b" " + target + b" " + version.encode()]
    lines += [f"{name}: {value}".encode() for name, value in headers]
    lines.append(b"")
    if eols is None:
        eols = [CRLF] * len(lines)
    assert len(eols) == len(lines)
    return leading + b"".join(line + eol for line, eol in zip(lines, eols, strict=True))


def host(port: int) -> tuple[str, str]:
    return ("Host", f"127.0.0.1:{port}")


def upgrade_headers(port: int) -> list[tuple[str, str]]:
    """Host and the headers of a valid upgrade, with a fresh key."""
    return [host(port), *websocket_headers().items()]


def canonical_target(topic: str) -> str:
    return f"/ws/{quote(topic, safe='')}"


def canonical_upgrade(port: int, topic: str) -> bytes:
    """The normal request: ``GET /ws/<percent-encoded topic> HTTP/1.1``, CRLFs."""
    return build_request(canonical_target(topic), upgrade_headers(port))


def encode_topic(topic: str, *, raw_non_ascii: bool = False) -> bytes:
    """*topic* percent-encoded like ``quote(safe='')``, or with its non-ASCII bytes raw."""
    out = bytearray()
    for byte in topic.encode():
        if raw_non_ascii and byte >= 0x80:
            out.append(byte)
        else:
            out += quote(bytes([byte]), safe="").encode()
    return bytes(out)


def expected_accept(request: bytes) -> str:
    """The ``Sec-WebSocket-Accept`` owed to *request*, whatever the case of its key's name."""
    match = re.search(rb"sec-websocket-key:[ \t]*([A-Za-z0-9+/=]+)", request, re.IGNORECASE)
    assert match is not None, request
    digest = hashlib.sha1(match.group(1) + WS_GUID.encode()).digest()
    return base64.b64encode(digest).decode()


# --- answers --------------------------------------------------------------------


def send_request(port: int, data: bytes) -> tuple[Response, RawClient]:
    """Send *data*; return the response head and the connection, holding the bytes
    read past the head (a RawClient, to read frames after a 101)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        sock.sendall(data)
        response, rest = read_head(sock, data)
    except BaseException:
        sock.close()
        raise
    return response, RawClient(sock, rest)


def read_head(sock: socket.socket, sent: bytes) -> tuple[Response, bytes]:
    """The response head (header names lowercased) and the bytes after it."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed without a response; got {data!r} for {sent[:300]!r}")
            data += chunk
            assert len(data) < 65536, "response head too large"
    except TimeoutError:
        raise AssertionError(f"no response in {TIMEOUT} s to {sent[:300]!r}") from None
    except ConnectionResetError:
        raise AssertionError(f"reset without a response to {sent[:300]!r}") from None
    head, rest = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    assert version.startswith("HTTP/1."), status_line
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(int(status), headers), rest


def http_answer(port: int, data: bytes) -> Response:
    response, client = send_request(port, data)
    client.close()
    return response


def served_by(response: Response, workers: int) -> int:
    """The worker index in the response's ``X-Signaling-Worker``, checked to be one."""
    value = response.headers.get(WORKER_HEADER)
    assert value is not None, f"no X-Signaling-Worker in the {response.status} answer"
    assert value.isdigit() and int(value) in range(workers), f"X-Signaling-Worker: {value!r}"
    return int(value)


@dataclass
class Joined:
    client: RawClient
    worker: int
    id: str
    peers: list[str]
    """The ids in its ``peer-list``."""


def finish_join(response: Response, client: RawClient, request: bytes, workers: int) -> Joined:
    """Check the 101 answer to *request* and read ``welcome`` and ``peer-list``."""
    try:
        assert response.status == 101, f"{response.status} for {request[:300]!r}"
        assert response.headers.get("sec-websocket-accept") == expected_accept(request), response
        worker = served_by(response, workers)
        welcome = client.recv_json()
        assert welcome.get("type") == "welcome", f"{welcome} for {request[:300]!r}"
        assert ULID.fullmatch(welcome["selfId"]), welcome
        peer_list = client.recv_json()
        assert peer_list.get("type") == "peer-list", peer_list
    except BaseException:
        client.close()
        raise
    return Joined(client, worker, welcome["selfId"], [entry["id"] for entry in peer_list["peers"]])


def join(port: int, request: bytes, workers: int) -> Joined:
    return finish_join(*send_request(port, request), request, workers)


def join_canonical(srv: Server, topic: str) -> Joined:
    """A canonical join, which must be served by the topic's owner."""
    workers = workers_of(srv)
    joined = join(srv.port, canonical_upgrade(srv.port, topic), workers)
    if joined.worker != topic_owner(topic, workers):
        joined.client.close()
        raise AssertionError(f"the canonical join of {topic!r} was served by {joined.worker}")
    return joined


def check_routed_join(srv: Server, topic: str, request: bytes) -> None:
    """A canonical peer joins *topic*; then *request* must be upgraded by the owner
    of *topic* and its peer-list must hold that peer."""
    workers = workers_of(srv)
    owner = topic_owner(topic, workers)
    first = join_canonical(srv, topic)
    with first.client:
        second = join(srv.port, request, workers)
        with second.client:
            assert second.worker == owner, (
                f"{topic!r} is owned by worker {owner}; {request!r} was upgraded by {second.worker}"
            )
            assert first.id in second.peers, (
                f"{request!r} joined without seeing {first.id}, who joined {topic!r} before"
            )


def expect_no_more(client: RawClient, code: int) -> None:
    """After the server's close frame with *code*: answer it; then the connection
    ends, with no frame in between."""
    with contextlib.suppress(OSError):
        client.send_frame(OP_CLOSE, code.to_bytes(2, "big"))
    try:
        frame = client.recv_frame()
    except (EOFError, ConnectionResetError):
        return
    raise AssertionError(f"a frame after the close frame: {frame}")


def expect_refusal(client: RawClient, code: str, close: int) -> None:
    """The next message is the error *code*, then the close frame with *close*,
    then nothing (no ``welcome``)."""
    frame = client.recv_frame()
    assert frame.opcode == OP_TEXT, f"{frame} instead of the error {code!r}"
    error = json.loads(frame.payload)
    assert error.get("type") == "error" and error.get("code") == code, (
        f"{error} instead of the error {code!r}"
    )
    assert isinstance(error.get("message"), str), error
    got = next_close(client)
    assert got == close, f"closed with {got}, not {close}, after {error}"
    expect_no_more(client, got)


def expect_refused_after_upgrade(srv: Server, request: bytes, code: str, close: int) -> None:
    """*request* is upgraded, then gets exactly one error *code*, the close
    code *close*, and nothing else."""
    response, client = send_request(srv.port, request)
    with client:
        assert response.status == 101, f"{response.status} for {request[:300]!r}, not 101"
        assert response.headers.get("sec-websocket-accept") == expected_accept(request)
        served_by(response, workers_of(srv))
        expect_refusal(client, code, close)


def next_close(client: RawClient) -> int:
    """The next frame must be the server's close frame; its code."""
    try:
        frame = client.recv_frame()
    except EOFError:
        raise AssertionError("connection dropped without a close frame") from None
    assert frame.opcode == OP_CLOSE, f"got {frame} instead of a close frame"
    return close_code_of(frame.payload)


# --- routing: one reading of a request --------------------------------------------


def lower(name: str) -> str:
    return name.lower()


def upper(name: str) -> str:
    return name.upper()


def alternate(name: str) -> str:
    return "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(name))


def shaped(
    *,
    leading: bytes = b"",
    eols: Callable[[int], list[bytes]] | None = None,
    names: Callable[[str], str] | None = None,
    raw: bool = False,
    absolute: bool = False,
    query: str = "",
) -> Callable[[int, str], bytes]:
    """A way to write the upgrade request of a topic, given the port and the topic."""

    def build(port: int, topic: str) -> bytes:
        segment = encode_topic(topic, raw_non_ascii=raw)
        target = b"/ws/" + segment + query.encode()
        if absolute:
            target = f"http://127.0.0.1:{port}".encode() + target
        headers = upgrade_headers(port)
        if names is not None:
            headers = [(names(name), value) for name, value in headers]
        lines = 1 + len(headers) + 1
        return build_request(
            target, headers, leading=leading, eols=None if eols is None else eols(lines)
        )

    return build


SHAPES: dict[str, Callable[[int, str], bytes]] = {
    "canonical": shaped(),
    "leading-crlf": shaped(leading=CRLF),
    "three-leading-crlf": shaped(leading=CRLF * 3),
    "leading-lf": shaped(leading=LF),
    "leading-lf-crlf-lf": shaped(leading=LF + CRLF + LF),
    "bare-lf": shaped(eols=lambda n: [LF] * n),
    "leading-lf-then-bare-lf": shaped(leading=LF, eols=lambda n: [LF] * n),
    "lf-request-line-then-crlf": shaped(eols=lambda n: [LF] + [CRLF] * (n - 1)),
    "alternating-lf-crlf": shaped(eols=lambda n: [CRLF if i % 2 else LF for i in range(n)]),
    "crlf-then-lf-blank-line": shaped(eols=lambda n: [CRLF] * (n - 1) + [LF]),
    "lf-then-crlf-blank-line": shaped(eols=lambda n: [LF] * (n - 1) + [CRLF]),
    "raw-utf8": shaped(raw=True),
    "raw-utf8-bare-lf": shaped(raw=True, eols=lambda n: [LF] * n),
    "lowercase-names": shaped(names=lower),
    "uppercase-names": shaped(names=upper),
    "mixed-case-names": shaped(names=alternate),
    "absolute-form": shaped(absolute=True),
    "absolute-form-with-query": shaped(absolute=True, query="?metadata=%7B%7D"),
    "absolute-form-raw-utf8-leading-lf": shaped(absolute=True, raw=True, leading=LF),
}


@on_workers(1, 2, 4)
@pytest.mark.parametrize("shape", SHAPES)
def test_join_is_upgraded_by_the_topic_owner_whatever_its_shape(door: Server, shape: str) -> None:
    for n in range(ATTEMPTS):
        topic = f"{shape}-{n}-café-ü"
        check_routed_join(door, topic, SHAPES[shape](door.port, topic))


@on_workers(1, 2, 4)
def test_raw_utf8_path_is_the_percent_encoded_topic_either_way(door: Server) -> None:
    """The topic café-ü sent as raw UTF-8 bytes is the topic café-ü: a raw joiner
    sees the canonical peer, and a canonical joiner sees the raw peer."""
    workers = workers_of(door)
    raw = SHAPES["raw-utf8"]
    assert raw(door.port, "café-ü").startswith("GET /ws/café-ü ".encode())
    check_routed_join(door, "café-ü", raw(door.port, "café-ü"))
    for n in range(ATTEMPTS):
        topic = f"ü-café-{n}"
        first = join(door.port, raw(door.port, topic), workers)
        with first.client:
            assert first.worker == topic_owner(topic, workers), (topic, first.worker)
            second = join_canonical(door, topic)
            with second.client:
                assert first.id in second.peers, (topic, second.peers)


def test_topic_limit_counts_every_shape_of_join(start_server: Callable[..., Server]) -> None:
    """With two workers and two peers a topic, joins of mixed shapes fill the
    topic exactly: two are admitted and the others get ``topic_full``, close 4009."""
    srv = start_server(
        "--workers", "2", "--max-peers-per-topic", "2", "--handshake-timeout", HANDSHAKE_TIMEOUT
    )
    srv.wait_records("listening", count=2)
    shapes = ["leading-crlf", "canonical", "bare-lf", "raw-utf8"]
    for rotation in range(len(shapes)):
        order = shapes[rotation:] + shapes[:rotation]
        topic = f"full-{rotation}-café-ü"
        owner = topic_owner(topic, 2)
        opened: list[RawClient] = []
        try:
            admitted: list[str] = []
            for shape in order:
                request = SHAPES[shape](srv.port, topic)
                response, client = send_request(srv.port, request)
                opened.append(client)
                assert response.status == 101, (shape, response)
                assert served_by(response, 2) == owner, f"{shape} join of {topic!r} mis-routed"
                if len(admitted) < 2:
                    joined = finish_join(response, client, request, 2)
                    assert joined.peers == admitted, (shape, order, joined.peers, admitted)
                    admitted.append(joined.id)
                else:
                    expect_refusal(client, "topic_full", 4009)
        finally:
            for client in opened:
                client.close()


# --- topic rules ------------------------------------------------------------------


@on_workers(1, 2, 4)
def test_encoded_slash_is_part_of_the_topic(door: Server) -> None:
    workers = workers_of(door)
    owner = topic_owner("org/room", workers)
    first = join(door.port, build_request("/ws/org%2Froom", upgrade_headers(door.port)), workers)
    with first.client:
        assert first.worker == owner
        second_request = build_request("/ws/org%2froom", upgrade_headers(door.port))
        second = join(door.port, second_request, workers)
        with second.client:
            assert second.worker == owner
            assert second.peers == [first.id]
            assert first.client.recv_json() == {"type": "peer-joined", "peerId": second.id}


@on_workers(1, 2)
@pytest.mark.parametrize("target", ["/ws/a/b", "/ws/room/", "/ws/a/b?metadata=%7B%7D"])
def test_unencoded_slash_is_another_path(door: Server, target: str) -> None:
    response = http_answer(door.port, build_request(target, upgrade_headers(door.port)))
    assert response.status == 404
    served_by(response, workers_of(door))


INVALID_TOPICS = {
    "257-bytes": quote("x" * 257),
    "257-bytes-utf8": quote("é" * 128 + "x"),
    "not-utf8": "%FF",
    "not-utf8-after-ascii": "room%C3%28",
    "bad-escape": "%zz",
    "half-bad-escape": "room%4g",
    "trailing-percent": "room%",
    "truncated-escape": "room%4",
}


@on_workers(1, 2)
@pytest.mark.parametrize("segment", INVALID_TOPICS.values(), ids=INVALID_TOPICS.keys())
def test_invalid_topic_is_upgraded_then_refused_with_4400(door: Server, segment: str) -> None:
    request = build_request(f"/ws/{segment}", upgrade_headers(door.port))
    expect_refused_after_upgrade(door, request, "invalid_topic", CLOSE_INVALID)


@on_workers(1, 2)
def test_empty_topic_is_refused_with_4400_or_404(door: Server) -> None:
    request = build_request("/ws/", upgrade_headers(door.port))
    response = http_answer(door.port, request)
    served_by(response, workers_of(door))
    if response.status != 404:
        expect_refused_after_upgrade(door, request, "invalid_topic", CLOSE_INVALID)


INVALID_METADATA = {
    "not-json": "{not json",
    "empty": "",
    "trailing-garbage": '{"a":1} trailing',
    "1025-bytes": '"' + "x" * 1023 + '"',
}


@on_workers(1, 2)
@pytest.mark.parametrize("metadata", INVALID_METADATA.values(), ids=INVALID_METADATA.keys())
def test_invalid_metadata_is_upgraded_then_refused_with_4400(door: Server, metadata: str) -> None:
    target = f"/ws/meta-room?metadata={quote(metadata, safe='')}"
    request = build_request(target, upgrade_headers(door.port))
    expect_refused_after_upgrade(door, request, "invalid_metadata", CLOSE_INVALID)


@on_workers(1, 2)
@pytest.mark.parametrize("segment", ["%FF", "%zz"])
def test_invalid_topic_without_upgrade_headers_is_426(door: Server, segment: str) -> None:
    request = build_request(f"/ws/{segment}", [host(door.port), ("Connection", "close")])
    response = http_answer(door.port, request)
    assert response.status == 426
    served_by(response, workers_of(door))


# --- HTTP answers, each naming its worker -------------------------------------------


def with_headers(
    target: str = "/ws/t",
    *,
    drop: Sequence[str] = (),
    extra: Sequence[tuple[str, str]] = (),
    replace: dict[str, str] | None = None,
    host_count: int = 1,
    **options: Any,
) -> Callable[[int], bytes]:
    """An upgrade request (Host, then the WebSocket headers) with changes."""

    def build(port: int) -> bytes:
        headers = [host(port)] * host_count
        headers += [
            (name, (replace or {}).get(name, value))
            for name, value in websocket_headers().items()
            if name not in drop
        ]
        return build_request(target, [*headers, *extra], **options)

    return build


def plain(target: str, *, host_count: int = 1) -> Callable[[int], bytes]:
    """A GET without upgrade headers."""
    return lambda port: build_request(target, [host(port)] * host_count + [("Connection", "close")])


def unfinished(build: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """The request *build* makes, without the blank line that ends its head."""
    return lambda port: build(port).removesuffix(CRLF)


HTTP_CASES = [
    pytest.param(plain("/healthz"), 200, {}, id="healthz-200"),
    pytest.param(plain("/nope"), 404, {}, id="unknown-path-404"),
    pytest.param(plain("/ws/t"), 426, {}, id="plain-get-on-a-topic-426"),
    pytest.param(lambda port: b"garbage\r\n\r\n", 400, {}, id="garbage-400"),
    pytest.param(with_headers(host_count=0), 400, {}, id="upgrade-without-host-400"),
    pytest.param(plain("/healthz", host_count=0), 400, {}, id="healthz-without-host-400"),
    pytest.param(with_headers(host_count=2), 400, {}, id="upgrade-with-two-hosts-400"),
    pytest.param(plain("/healthz", host_count=2), 400, {}, id="healthz-with-two-hosts-400"),
    pytest.param(
        with_headers(replace={"Sec-WebSocket-Version": "8"}),
        426,
        {"sec-websocket-version": "13"},
        id="websocket-version-8-426",
    ),
    pytest.param(with_headers(version="HTTP/2.0"), 505, {}, id="http-2.0-505"),
    pytest.param(with_headers(version="HTTP/1.0"), 505, {}, id="http-1.0-505"),
    pytest.param(
        with_headers(method="POST", extra=[("Content-Length", "0")]), 405, {}, id="post-405"
    ),
    pytest.param(with_headers("/ws/h?pad=" + "a" * 8200), 414, {}, id="request-line-over-8KiB-414"),
    pytest.param(
        with_headers("/ws/h", extra=[(f"X-H{i}", "v") for i in range(124)]),
        431,
        {},
        id="129-headers-431",
    ),
    pytest.param(
        with_headers("/ws/h", extra=[("X-Long", "a" * 8200)]), 431, {}, id="header-over-8KiB-431"
    ),
    pytest.param(
        unfinished(with_headers("/ws/h", extra=[(f"X-H{i}", "b" * 1000) for i in range(17)])),
        431,
        {},
        id="unfinished-head-over-16KiB-431",
    ),
    pytest.param(
        with_headers(extra=[("Origin", "https://b.example")]), 403, {}, id="origin-not-allowed-403"
    ),
]


@on_workers(1, 2)
@pytest.mark.parametrize(("build", "status", "headers"), HTTP_CASES)
def test_http_answer_names_its_worker(
    door: Server, build: Callable[[int], bytes], status: int, headers: dict[str, str]
) -> None:
    request = build(door.port)
    response = http_answer(door.port, request)
    assert response.status == status, f"{response.status} for {request[:200]!r}"
    served_by(response, workers_of(door))
    for name, value in headers.items():
        assert response.headers.get(name) == value, (name, response.headers)


def test_http_cases_are_the_requests_they_say() -> None:
    """The sizes the limit cases rely on."""
    port = 8081
    build: dict[str, Callable[[int], bytes]] = {
        str(case.id): case.values[0]  # type: ignore[misc]
        for case in HTTP_CASES
    }
    request_line = build["request-line-over-8KiB-414"](port).split(CRLF, 1)[0]
    assert len(request_line) > 8192
    assert build["129-headers-431"](port).count(CRLF) == 1 + 129 + 1
    unfinished_head = build["unfinished-head-over-16KiB-431"](port)
    assert len(unfinished_head) > 16384 and not unfinished_head.endswith(CRLF * 2)
    assert b"Host:" not in build["upgrade-without-host-400"](port)
    assert build["upgrade-with-two-hosts-400"](port).count(b"Host:") == 2


# --- frames -------------------------------------------------------------------------


@pytest.fixture
def client(door: Server) -> Iterator[RawClient]:
    raw, _ = RawClient.join(door.port, f"/ws/frames-{os.urandom(4).hex()}")
    with raw:
        yield raw


@on_workers(1)
@pytest.mark.parametrize(
    "length",
    [b"\x80" + b"\x00" * 7, b"\x80" + b"\x00" * 6 + b"\x01", b"\xff" * 8],
    ids=["2^63", "2^63+1", "2^64-1"],
)
def test_64_bit_length_with_its_top_bit_set_is_a_protocol_error(
    client: RawClient, length: bytes
) -> None:
    client.send(bytes([0x80 | OP_TEXT, 0x80 | 127]) + length + os.urandom(4))
    assert next_close(client) == 1002


PADDED_PING = b'{"type":"ping","msgId":"f"' + b" " * 997 + b"}"


def fragmented(message: bytes, frames: int) -> bytes:
    """*message* as *frames* frames of a text message, one byte each, with empty
    continuations in the middle when there are more frames than bytes."""
    pieces = [message[i : i + 1] for i in range(len(message))]
    middle = len(pieces) // 2
    pieces[middle:middle] = [b""] * (frames - len(pieces))
    assert len(pieces) == frames
    last = len(pieces) - 1
    return b"".join(
        encode_frame(OP_TEXT if i == 0 else OP_CONT, piece, fin=i == last)
        for i, piece in enumerate(pieces)
    )


@on_workers(1)
def test_message_in_1024_frames_is_accepted(client: RawClient) -> None:
    assert len(PADDED_PING) == 1024
    assert json.loads(PADDED_PING) == {"type": "ping", "msgId": "f"}
    client.send(fragmented(PADDED_PING, 1024))
    assert client.recv_json() == {"type": "pong", "msgId": "f"}


@on_workers(1)
def test_message_in_1025_frames_closes_with_1009(client: RawClient) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        client.send(fragmented(PADDED_PING, 1025))
    assert next_close(client) == 1009


PINGS = 2000


def ping_flood() -> bytes:
    return b"".join(encode_frame(OP_PING, i.to_bytes(2, "big")) for i in range(PINGS))


def test_ping_flood_is_bounded_by_the_rate_limit(start_server: Callable[..., Server]) -> None:
    """With --rate-limit 5 (burst 5), WebSocket pings count as messages: few are
    answered, and ten unanswered ones within 10 s close the connection with 4008."""
    rate, burst, slack = 5, 5, 3
    srv = start_server("--workers", "1", "--rate-limit", str(rate))
    with RawClient.join(srv.port, "/ws/ping-flood")[0] as client:
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            client.send(ping_flood())
            # Answered only if the server read every ping and kept the connection.
            client.send_frame(OP_TEXT, b'{"type":"ping","msgId":"after-flood"}')
        pongs, errors, close = 0, [], None
        deadline = started + 10
        while close is None:
            try:
                frame = client.recv_frame(deadline - time.monotonic())
            except (EOFError, ConnectionResetError):
                break
            if frame.opcode == OP_PONG:
                pongs += 1
            elif frame.opcode == OP_CLOSE:
                close = close_code_of(frame.payload)
            elif frame.opcode == OP_TEXT:
                message = json.loads(frame.payload)
                if message.get("type") == "pong":
                    break  # every ping was read and the connection is still open
                errors.append(message)
        elapsed = time.monotonic() - started
    assert pongs <= burst + rate * elapsed + slack, (
        f"{pongs} of {PINGS} pings answered in {elapsed:.2f} s at {rate}/s"
    )
    assert close == 4008, f"closed with {close} after {pongs} pongs; errors {errors[:3]}"
    assert all(e.get("code") in ("rate_limited", "slow_consumer") for e in errors), errors[:3]


@on_workers(1)
def test_ping_flood_is_answered_in_full_without_a_rate_limit(client: RawClient) -> None:
    client.send(ping_flood())
    payloads = []
    while len(payloads) < PINGS:
        frame = client.recv_frame()
        assert frame.opcode == OP_PONG, frame
        payloads.append(frame.payload)
    assert payloads == [i.to_bytes(2, "big") for i in range(PINGS)]
    client.send_frame(OP_TEXT, b'{"type":"ping","msgId":"after"}')
    assert client.recv_json() == {"type": "pong", "msgId": "after"}


@on_workers(1)
def test_lone_surrogate_escape_in_to_is_a_target_not_found(client: RawClient) -> None:
    client.send_frame(OP_TEXT, rb'{"type":"offer","to":"\ud800","msgId":"s"}')
    error = client.recv_json()
    assert error.get("type") == "error" and error.get("code") == "target_not_found", error
    assert error.get("msgId") == "s", error
    assert isinstance(error.get("message"), str), error
    client.send_frame(OP_TEXT, b'{"type":"ping","msgId":"still-open"}')
    assert client.recv_json() == {"type": "pong", "msgId": "still-open"}


# --- property: every shape of a join reaches its topic --------------------------------

PROPERTY_TOPICS = (
    "prop-plain",
    "prop/slash",
    "prop-café-ü",
    "prop room 1",
    "prop-100%",
    "prop-日本",
    "prop:a;b=c",
    "prop-a+b@c~!",
)
PROPERTY_WORKERS = 4
RAW_OK = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@"
)
"""ASCII bytes a path segment may carry unencoded; `/`, `%`, space and the rest never are."""
HEADER_NAMES = ("Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version")
NAME_CASES: tuple[Callable[[str], str], ...] = (str, lower, upper, alternate, str.swapcase)


def char_encodings(char: str) -> list[bytes]:
    """How one character of a topic may be written in its path segment: raw
    (its UTF-8 bytes, when it may be), or each byte percent-encoded in
    either case. A character half raw, half encoded is not UTF-8 in the
    request line, which the server refuses (400) before any routing."""
    utf8 = char.encode()
    forms = [
        b"".join(f"%{byte:02X}".encode() for byte in utf8),
        b"".join(f"%{byte:02x}".encode() for byte in utf8),
    ]
    if len(utf8) > 1 or utf8[0] in RAW_OK:
        forms.insert(0, utf8)
    return list(dict.fromkeys(forms))


@dataclass(frozen=True)
class GeneratedJoin:
    topic: str
    request: bytes


@st.composite
def generated_joins(draw: st.DrawFn, port: int) -> GeneratedJoin:
    topic = draw(st.sampled_from(PROPERTY_TOPICS))
    segment = b"".join(draw(st.sampled_from(char_encodings(c))) for c in topic)
    target = b"/ws/" + segment + draw(st.sampled_from([b"", b"?metadata=%7B%7D"]))
    if draw(st.booleans()):
        target = f"http://127.0.0.1:{port}".encode() + target
    values = dict(upgrade_headers(port))
    headers = [(draw(st.sampled_from(NAME_CASES))(name), values[name]) for name in HEADER_NAMES]
    headers = draw(st.permutations(headers))
    leading = b"".join(draw(st.lists(st.sampled_from([CRLF, LF]), max_size=3)))
    lines = 1 + len(headers) + 1
    eols = draw(st.lists(st.sampled_from([CRLF, LF]), min_size=lines, max_size=lines))
    return GeneratedJoin(topic, build_request(target, headers, leading=leading, eols=eols))


@on_workers(PROPERTY_WORKERS)
def test_every_generated_join_reaches_its_topic_owner(door: Server) -> None:
    """Generated shapes of a join for topics that each hold a canonical peer: the
    server refuses one with an HTTP status (naming its worker) or upgrades it on
    the topic's owner, into a peer-list that holds the canonical peer. Every
    shape generated here is valid, so every one must be upgraded."""
    outcomes: Counter[str] = Counter()
    canonical: dict[str, Joined] = {}
    try:
        for topic in PROPERTY_TOPICS:
            canonical[topic] = join_canonical(door, topic)

        # No shrinking: a request the server cannot read costs the 2 s handshake timeout.
        @settings(
            max_examples=60,
            deadline=None,
            derandomize=True,
            database=None,
            phases=(Phase.explicit, Phase.generate),
        )
        @given(generated=generated_joins(door.port))
        def check(generated: GeneratedJoin) -> None:
            response, client = send_request(door.port, generated.request)
            with client:
                if response.status >= 400:
                    served_by(response, PROPERTY_WORKERS)
                    outcomes["refused"] += 1
                    return
                joined = finish_join(response, client, generated.request, PROPERTY_WORKERS)
                owner = topic_owner(generated.topic, PROPERTY_WORKERS)
                assert joined.worker == owner, f"upgraded by {joined.worker}, owner {owner}"
                assert canonical[generated.topic].id in joined.peers, joined.peers
                outcomes["upgraded"] += 1

        check()
    finally:
        for joined in canonical.values():
            joined.client.close()
    assert outcomes["refused"] == 0, outcomes
    assert sum(outcomes.values()) >= 30, outcomes
