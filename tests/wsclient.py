"""Clients for testing the signaling server over loopback.

`Peer` wraps a `websockets` connection and keeps the peer's view of its topic
(``peer-list`` plus every ``peer-joined`` minus every ``peer-left``). It fails
loudly on any presence event that would make that view inconsistent, so every
test that reads presence events also checks the exact-view guarantee.

`RawClient` speaks RFC 6455 by hand over a blocking socket, so tests can send
frames that a conforming library refuses to build and read the server's close
frame byte for byte. `http_get` sends one hand-written HTTP request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect

TIMEOUT = 5.0
"""Seconds to wait for anything the server owes us."""

ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
RELAY_TYPES = ("offer", "answer", "ice-candidate")
PRESENCE_TYPES = ("peer-joined", "peer-left", "peer-updated")

ABSENT = "<no metadata>"
"""Stands for a peer's metadata in a view when the server sent none."""

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run *coro* in a fresh event loop; fail with TimeoutError after *timeout* s."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# --- WebSocket peers ---------------------------------------------------------


class Peer:
    """One connected client with its view of the topic.

    Presence events are applied to `view` as they are read; every other
    message is queued and handed out by `recv` in arrival order.
    """

    def __init__(self, ws: ClientConnection, welcome: dict[str, Any], peers: list[Any]) -> None:
        self.ws = ws
        self.welcome = welcome
        self.id: str = welcome["selfId"]
        self.view: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self.departed: set[str] = set()
        self._pending: deque[str] = deque()
        self._paused = False
        #: WebSocket bytes (frame headers included) read and sent so far.
        self.wire_in = 0
        self.wire_out = 0
        for entry in peers:
            assert isinstance(entry, dict), entry
            assert set(entry) <= {"id", "metadata"}, entry
            assert ULID.fullmatch(entry["id"]), entry
            assert entry["id"] != self.id, "a peer is listed in its own peer-list"
            assert entry["id"] not in self.view, f"duplicate entry in peer-list: {entry}"
            self.view[entry["id"]] = entry.get("metadata", ABSENT)
        self.initial_view = dict(self.view)

    @classmethod
    async def join(cls, url: str, **kwargs: Any) -> Peer:
        """Connect to *url* and read ``welcome`` and ``peer-list``, checking their shape."""
        # max_queue=None: the library must not stop reading on its own when a
        # test leaves events unread; only `pause_reading` should do that.
        ws = await connect(
            url,
            max_size=None,
            max_queue=None,
            compression=None,
            open_timeout=10,
            close_timeout=2,
            **kwargs,
        )
        try:
            greeting = [await asyncio.wait_for(ws.recv(), TIMEOUT) for _ in range(2)]
            welcome, peer_list = (json.loads(text) for text in greeting)
        except BaseException:
            ws.transport.abort()
            raise
        assert welcome.get("type") == "welcome", welcome
        assert isinstance(welcome.get("selfId"), str), welcome
        assert ULID.fullmatch(welcome["selfId"]), welcome
        interval = welcome.get("pingInterval")
        assert isinstance(interval, (int, float)) and not isinstance(interval, bool), welcome
        assert peer_list.get("type") == "peer-list", peer_list
        assert set(peer_list) == {"type", "peers"}, peer_list
        assert isinstance(peer_list["peers"], list), peer_list
        peer = cls(ws, welcome, peer_list["peers"])
        peer.wire_in = sum(
            frame_size(len(text.encode() if isinstance(text, str) else text)) for text in greeting
        )
        return peer

    def response_header(self, name: str) -> str | None:
        """A header of the server's answer to the upgrade request, or None."""
        assert self.ws.response is not None
        return self.ws.response.headers.get(name)

    # sending

    async def send(self, message: Mapping[str, Any] | str | bytes) -> None:
        """Send a JSON object, or a text (str) or binary (bytes) frame as is."""
        if isinstance(message, Mapping):
            message = json.dumps(message)
        data = message.encode() if isinstance(message, str) else message
        self.wire_out += frame_size(len(data), masked=True)
        await self.ws.send(message)

    async def relay(
        self, kind: str, to: Any, payload: Any = None, msg_id: str | None = None
    ) -> None:
        message: dict[str, Any] = {"type": kind, "to": to, "payload": payload}
        if msg_id is not None:
            message["msgId"] = msg_id
        await self.send(message)

    # receiving

    async def recv_text(self, timeout: float = TIMEOUT) -> str:
        """Return the raw text of the next message that is not a presence event."""

        async def next_message() -> str:
            while not self._pending:
                await self._read()
            return self._pending.popleft()

        return await asyncio.wait_for(next_message(), timeout)

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Return the next message that is not a presence event."""
        message: dict[str, Any] = json.loads(await self.recv_text(timeout))
        return message

    async def recv_error(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Return the next message, which must be an ``error`` with a string message."""
        message = await self.recv(timeout)
        assert message.get("type") == "error", message
        assert isinstance(message.get("code"), str), message
        assert isinstance(message.get("message"), str), message
        return message

    async def wait_until(self, condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        """Read until *condition* holds (typically on `view`); other messages stay queued."""

        async def read_until() -> None:
            while not condition():
                await self._read()

        await asyncio.wait_for(read_until(), timeout)

    async def wait_joined(self, *peer_ids: str, timeout: float = TIMEOUT) -> None:
        await self.wait_until(lambda: all(p in self.view for p in peer_ids), timeout)

    async def wait_left(self, *peer_ids: str, timeout: float = TIMEOUT) -> None:
        await self.wait_until(lambda: all(p in self.departed for p in peer_ids), timeout)

    async def sync(self) -> None:
        """Round-trip an application ping.

        The server answers a peer's messages in order, so once the pong is back
        every reply owed for earlier messages has been read (and must have been
        consumed by the test: the pong has to be the next message).
        """
        token = f"sync-{os.urandom(4).hex()}"
        await self.send({"type": "ping", "msgId": token})
        assert await self.recv() == {"type": "pong", "msgId": token}

    async def _read(self) -> None:
        frame = await self.ws.recv()
        assert isinstance(frame, str), f"server sent a binary frame: {frame!r}"
        self.wire_in += frame_size(len(frame.encode()))
        message = json.loads(frame)
        assert isinstance(message, dict), frame
        if message.get("type") in PRESENCE_TYPES:
            self._apply_presence(message)
        else:
            self._pending.append(frame)

    def _apply_presence(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        peer_id = event.get("peerId")
        assert isinstance(peer_id, str) and ULID.fullmatch(peer_id), event
        if event["type"] == "peer-joined":
            assert set(event) <= {"type", "peerId", "metadata"}, event
            assert peer_id != self.id, f"{self.id} told that it joined itself"
            assert peer_id not in self.view, f"{self.id}: peer-joined for a known peer: {event}"
            self.view[peer_id] = event.get("metadata", ABSENT)
        elif event["type"] == "peer-updated":
            assert set(event) == {"type", "peerId", "metadata"}, event
            assert peer_id in self.view, f"{self.id}: peer-updated for an unknown peer: {event}"
            metadata = event["metadata"]
            self.view[peer_id] = ABSENT if metadata is None else metadata
        else:
            assert set(event) == {"type", "peerId"}, event
            assert peer_id in self.view, f"{self.id}: peer-left for an unknown peer: {event}"
            del self.view[peer_id]
            self.departed.add(peer_id)

    # closing

    def pause_reading(self) -> None:
        """Stop reading from the socket: the server's frames pile up unread."""
        self.ws.transport.pause_reading()
        self._paused = True

    def resume_reading(self) -> None:
        """Read from the socket again."""
        self.ws.transport.resume_reading()
        self._paused = False

    def abort(self) -> None:
        """Drop the TCP connection without a closing handshake."""
        self.ws.transport.abort()

    async def wait_closed(self, timeout: float = TIMEOUT) -> int | None:
        """Wait until the server closes the connection; return the close code received."""
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        return self.ws.close_code

    async def close(self) -> None:
        if self._paused:
            self.abort()
        else:
            await self.ws.close()


class Peers:
    """Joins peers for one test and closes every one of them when the test ends."""

    def __init__(self) -> None:
        self.opened: list[Peer] = []

    async def join(self, url: str, **kwargs: Any) -> Peer:
        peer = await Peer.join(url, **kwargs)
        self.opened.append(peer)
        return peer

    async def join_all(self, *urls: str) -> list[Peer]:
        """Join every url concurrently."""
        return list(await asyncio.gather(*(self.join(url) for url in urls)))

    async def __aenter__(self) -> Peers:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.gather(*(peer.close() for peer in self.opened), return_exceptions=True)


def frame_size(payload: int, *, masked: bool = False) -> int:
    """Bytes of one unfragmented WebSocket frame carrying *payload* bytes."""
    header = 2 if payload < 126 else 4 if payload < 1 << 16 else 10
    return header + (4 if masked else 0) + payload


# --- HTTP --------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    """Header names are lowercased."""
    body: bytes = b""
    """The body, as long as ``Content-Length`` said (``http_get`` only)."""


def websocket_headers() -> dict[str, str]:
    """The headers of a valid upgrade request, with a fresh key."""
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }


def http_get(
    port: int,
    path: str,
    headers: Mapping[str, str] | None = None,
    source_port: int | None = None,
) -> Response:
    """Send one ``GET`` with exactly *headers* (plus ``Host``) and return the response head.

    With *source_port*, the connection comes from that local port (see `connect_from`).
    """
    if source_port is None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    else:
        sock = connect_from(port, source_port)
    with sock:
        response, body = _request(sock, port, path, headers or {"Connection": "close"})
        length = int(response.headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed {length - len(body)} bytes before the body's end"
            body += chunk
        return Response(response.status, response.headers, body[:length])


def connect_from(port: int, source_port: int) -> socket.socket:
    """A TCP connection to the server from ``127.0.0.1:source_port``.

    The kernel spreads the connections to a port shared by several listening
    sockets (``SO_REUSEPORT``) by a hash of the address pair, so connections
    from one source port reach the same listener. Closing the socket resets
    the connection (``SO_LINGER`` 0), so that it leaves no ``TIME_WAIT``
    behind and the next connection from that port can be made at once.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.bind(("127.0.0.1", source_port))
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _request(
    sock: socket.socket, port: int, path: str, headers: Mapping[str, str]
) -> tuple[Response, bytes]:
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the response head; got {data!r}"
        data += chunk
        assert len(data) < 65536, "response head too large"
    head, rest = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return Response(int(status), parsed), rest


# --- raw RFC 6455 client -----------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
RSV1, RSV2, RSV3 = 0x40, 0x20, 0x10
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def encode_frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    """Build one frame as a client would; every flag is settable, valid or not."""
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if mask else 0
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", first, mask_bit | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + apply_mask(payload, key)


def apply_mask(data: bytes, key: bytes) -> bytes:
    size = len(data)
    stream = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(size, "big")


def close_code_of(payload: bytes) -> int:
    """The status code in a close frame's payload (1005 when it has none)."""
    if not payload:
        return 1005
    assert len(payload) >= 2, f"close payload of one byte: {payload!r}"
    code: int = struct.unpack("!H", payload[:2])[0]
    return code


@dataclass(frozen=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes


class RawClient:
    """A WebSocket client over a blocking socket, for hand-built frames."""

    def __init__(self, sock: socket.socket, buffered: bytes) -> None:
        self.sock = sock
        self._buffer = buffered

    @classmethod
    def connect(
        cls,
        port: int,
        path: str,
        headers: Mapping[str, str] | None = None,
        rcvbuf: int | None = None,
    ) -> RawClient:
        """Open a connection and complete the upgrade handshake on *path*."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(("127.0.0.1", port))
            request_headers = {**websocket_headers(), **(headers or {})}
            response, rest = _request(sock, port, path, request_headers)
            assert response.status == 101, response
            digest = hashlib.sha1((request_headers["Sec-WebSocket-Key"] + WS_GUID).encode())
            expected = base64.b64encode(digest.digest()).decode()
            assert response.headers.get("sec-websocket-accept") == expected, response
        except BaseException:
            sock.close()
            raise
        return cls(sock, rest)

    @classmethod
    def join(cls, port: int, path: str, rcvbuf: int | None = None) -> tuple[RawClient, str]:
        """Connect, read ``welcome`` and ``peer-list``; return the client and its id."""
        client = cls.connect(port, path, rcvbuf=rcvbuf)
        welcome = client.recv_json()
        assert welcome.get("type") == "welcome", welcome
        assert client.recv_json().get("type") == "peer-list"
        return client, welcome["selfId"]

    def send(self, data: bytes) -> None:
        """Write bytes as they are: one frame, several, or a partial one."""
        self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: bytes = b"", **flags: Any) -> None:
        self.send(encode_frame(opcode, payload, **flags))

    def recv_frame(self, timeout: float = TIMEOUT) -> Frame:
        """Read one frame; EOFError when the server closed the TCP connection."""
        deadline = time.monotonic() + timeout
        first, second = self._read_exactly(2, deadline)
        assert not first & 0x70, f"server frame with RSV bits set: {first:#x}"
        assert not second & 0x80, "server frames must not be masked"
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", self._read_exactly(2, deadline))
        elif size == 127:
            (size,) = struct.unpack("!Q", self._read_exactly(8, deadline))
        payload = self._read_exactly(size, deadline)
        return Frame(bool(first & 0x80), first & 0x0F, payload)

    def recv_json(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Read up to the next complete text message, answering pings on the way."""
        deadline = time.monotonic() + timeout
        parts: list[bytes] = []
        while True:
            frame = self.recv_frame(deadline - time.monotonic())
            if frame.opcode == OP_PING:
                self.send_frame(OP_PONG, frame.payload)
                continue
            assert frame.opcode in (OP_TEXT, OP_CONT), frame
            parts.append(frame.payload)
            if frame.fin:
                message: dict[str, Any] = json.loads(b"".join(parts).decode())
                return message

    def expect_close(self, timeout: float = TIMEOUT) -> int:
        """Skip frames until the server's close frame; return its status code."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = self.recv_frame(deadline - time.monotonic())
            except EOFError:
                raise AssertionError("connection dropped without a close frame") from None
            if frame.opcode == OP_CLOSE:
                return close_code_of(frame.payload)

    def read_until_close(self, timeout: float = TIMEOUT) -> tuple[list[dict[str, Any]], int]:
        """Every text message up to the server's close frame, and the close's status code."""
        deadline = time.monotonic() + timeout
        messages: list[dict[str, Any]] = []
        while True:
            try:
                frame = self.recv_frame(deadline - time.monotonic())
            except EOFError:
                raise AssertionError(f"no close frame after {messages}") from None
            if frame.opcode == OP_CLOSE:
                return messages, close_code_of(frame.payload)
            if frame.opcode == OP_TEXT:
                assert frame.fin, "the server fragments nothing"
                messages.append(json.loads(frame.payload))

    def wait_disconnected(self, timeout: float = TIMEOUT) -> None:
        """Read (never answering pings) until the server closes the connection."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = self.recv_frame(deadline - time.monotonic())
            except (EOFError, ConnectionResetError):
                return
            if frame.opcode == OP_CLOSE:
                return

    def answer_pings(self, count: int, timeout: float = TIMEOUT) -> None:
        """Answer the server's pings until *count* of them have come in."""
        deadline = time.monotonic() + timeout
        seen = 0
        while seen < count:
            frame = self.recv_frame(deadline - time.monotonic())
            assert frame.opcode != OP_CLOSE, f"closed: {close_code_of(frame.payload)}"
            if frame.opcode == OP_PING:
                self.send_frame(OP_PONG, frame.payload)
                seen += 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read_exactly(self, size: int, deadline: float) -> bytes:
        while len(self._buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame from the server in time")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data
