"""RFC 6455 framing, checked with hand-built frames and the server's close codes."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
from conftest import Server
from wsclient import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RSV1,
    RSV3,
    RawClient,
    encode_frame,
)

MAX_MESSAGE = 65536
PING = b'{"type":"ping","msgId":"p"}'


@pytest.fixture
def client(server: Server) -> Iterator[RawClient]:
    raw, _ = RawClient.join(server.port, "/ws/frames")
    with raw:
        yield raw


def ping_of_size(size: int) -> bytes:
    """An application ping whose JSON text is exactly *size* bytes."""
    message = b'{"type":"ping","msgId":"' + b"x" * (size - 26) + b'"}'
    assert len(message) == size
    return message


PROTOCOL_ERRORS = {
    "unmasked": encode_frame(OP_TEXT, PING, mask=False),
    "rsv1-without-extension": encode_frame(OP_TEXT, PING, rsv=RSV1),
    "rsv3-on-ping": encode_frame(OP_PING, b"", rsv=RSV3),
    "fragmented-ping": encode_frame(OP_PING, b"x", fin=False),
    "ping-over-125-bytes": encode_frame(OP_PING, b"x" * 126),
    "continuation-without-start": encode_frame(OP_CONT, PING),
    "reserved-data-opcode": encode_frame(0x3, PING),
    "reserved-control-opcode": encode_frame(0xB, b""),
    "text-inside-fragmented-text": (
        encode_frame(OP_TEXT, PING[:10], fin=False) + encode_frame(OP_TEXT, PING)
    ),
}

INVALID_UTF8 = {
    "invalid-byte": encode_frame(OP_TEXT, b'{"type":"ping","msgId":"\xff"}'),
    "overlong": encode_frame(OP_TEXT, b'{"type":"ping","msgId":"\xc0\xaf"}'),
    "surrogate": encode_frame(OP_TEXT, b'{"type":"ping","msgId":"\xed\xa0\x80"}'),
    "truncated-sequence": encode_frame(OP_TEXT, b'{"type":"ping"} \xc3'),
    "across-fragments": (
        encode_frame(OP_TEXT, b'{"type":"ping","msgId":"\xc3', fin=False)
        + encode_frame(OP_CONT, b'("}')
    ),
}

TOO_LARGE = {
    "one-frame": encode_frame(OP_TEXT, ping_of_size(MAX_MESSAGE + 1)),
    "fragments": (
        encode_frame(OP_TEXT, b"[" + b"1," * 20000, fin=False)
        + encode_frame(OP_CONT, b"1," * 20000, fin=False)
        + encode_frame(OP_CONT, b"1]")
    ),
}

CASES = [
    *((name, frames, 1002) for name, frames in PROTOCOL_ERRORS.items()),
    *((name, frames, 1007) for name, frames in INVALID_UTF8.items()),
    *((name, frames, 1009) for name, frames in TOO_LARGE.items()),
]


@pytest.mark.parametrize(("frames", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_frames_close_the_connection(client: RawClient, frames: bytes, code: int) -> None:
    # The server may close while we are still writing; its close frame is sent by then.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        client.send(frames)
    assert client.expect_close() == code


def test_message_at_the_size_limit_is_accepted(client: RawClient) -> None:
    message = ping_of_size(MAX_MESSAGE)
    client.send_frame(OP_TEXT, message)
    assert client.recv_json(timeout=10) == {"type": "pong", "msgId": json.loads(message)["msgId"]}


def test_fragmented_message_with_interleaved_ping_is_one_message(client: RawClient) -> None:
    text = '{"type":"ping","msgId":"frag-é-end"}'.encode()
    split = text.index("é".encode()) + 1  # inside the two bytes of "é"
    client.send_frame(OP_TEXT, text[:10], fin=False)
    client.send_frame(OP_PING, b"heartbeat")
    client.send_frame(OP_CONT, text[10:split], fin=False)
    client.send_frame(OP_CONT, b"", fin=False)
    client.send_frame(OP_CONT, text[split:])

    pong_payloads: list[bytes] = []
    messages: list[object] = []
    while not (pong_payloads and messages):
        frame = client.recv_frame()
        assert frame.fin
        assert frame.opcode in (OP_PONG, OP_TEXT), frame
        if frame.opcode == OP_PONG:
            pong_payloads.append(frame.payload)
        else:
            messages.append(json.loads(frame.payload))
    assert pong_payloads == [b"heartbeat"]
    assert messages == [{"type": "pong", "msgId": "frag-é-end"}]


def test_binary_frame_gets_an_error_and_the_connection_stays_open(client: RawClient) -> None:
    client.send_frame(OP_BINARY, PING)
    error = client.recv_json()
    assert error["type"] == "error"
    assert error["code"] == "unsupported_frame"
    client.send_frame(OP_TEXT, PING)
    assert client.recv_json() == {"type": "pong", "msgId": "p"}


def test_client_close_is_echoed(client: RawClient) -> None:
    client.send_frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"done")
    assert client.expect_close() == 1000
