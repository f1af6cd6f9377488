"""Abusive clients before the upgrade: slowloris, and request heads over the limits."""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import Server, launch
from wsclient import TIMEOUT, Peers, Response, run, websocket_headers

# --- slowloris -----------------------------------------------------------------

SLOW_SOCKETS = 1000
HANDSHAKE_TIMEOUT = 2.0
MARGIN = 1.5
"""Seconds past the handshake deadline by which a slow socket must be closed."""


def ensure_fd_limit(needed: int) -> None:
    """Raise this process's open-file limit to *needed* (servers started later inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def upgrade_request(port: int, topic: str) -> bytes:
    lines = [f"GET /ws/{topic} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in websocket_headers().items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Slowloris:
    """Sockets that send a valid upgrade request one byte a second.

    Half of them send their request line at once, then drip the headers;
    the others drip from the first byte. Each socket's close by the server
    is noticed by a reader callback and timed.
    """

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.request = upgrade_request(port, "slow")
        self.line_end = self.request.index(b"\r\n") + 2
        self.sockets: list[socket.socket] = []
        self.sent: list[int] = []
        self.opened_at: list[float] = []
        self.closed_at: dict[int, float] = {}
        self.answered: list[bytes] = []
        self.all_closed = asyncio.Event()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for index in range(self.count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            self.sockets.append(sock)
            await loop.sock_connect(sock, ("127.0.0.1", self.port))
            self.opened_at.append(time.monotonic())
            first = self.line_end if index % 2 else 1
            sock.send(self.request[:first])
            self.sent.append(first)
            loop.add_reader(sock.fileno(), self.on_readable, index)

    def on_readable(self, index: int) -> None:
        sock = self.sockets[index]
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.answered.append(data)  # the server owes a dripping client nothing
            return
        self.mark_closed(index)

    def mark_closed(self, index: int) -> None:
        if index in self.closed_at:
            return
        self.closed_at[index] = time.monotonic()
        asyncio.get_running_loop().remove_reader(self.sockets[index].fileno())
        if len(self.closed_at) == self.count:
            self.all_closed.set()

    async def drip(self) -> None:
        """One more byte a second on every open socket; never the whole request."""
        while not self.all_closed.is_set():
            await asyncio.sleep(1.0)
            for index, sock in enumerate(self.sockets):
                if index in self.closed_at or self.sent[index] >= len(self.request) - 1:
                    continue
                position = self.sent[index]
                try:
                    self.sent[index] += sock.send(self.request[position : position + 1])
                except BlockingIOError:
                    pass
                except OSError:  # reset: the server closed it
                    self.mark_closed(index)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for index, sock in enumerate(self.sockets):
            if index not in self.closed_at:
                loop.remove_reader(sock.fileno())
            sock.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_slowloris_sockets_are_closed_at_the_deadline_and_others_still_relay(
    start_server: Callable[..., Server], workers: str
) -> None:
    ensure_fd_limit(2 * SLOW_SOCKETS + 512)
    srv = start_server("--workers", workers, "--handshake-timeout", str(HANDSHAKE_TIMEOUT))

    async def scenario() -> None:
        slow = Slowloris(srv.port, SLOW_SOCKETS)
        dripper: asyncio.Task[None] | None = None
        try:
            await slow.open()
            dripper = asyncio.create_task(slow.drip())
            async with Peers() as peers:
                alice, bob = await peers.join_all(srv.url("normal"), srv.url("normal"))
                await alice.wait_joined(bob.id)
                await alice.relay("offer", bob.id, {"sdp": "v=0"}, msg_id="during")
                offer = await bob.recv()
                await bob.relay("answer", alice.id, {"sdp": "v=0"}, msg_id="during")
                answer = await alice.recv()
                assert offer["msgId"] == answer["msgId"] == "during"
                assert not slow.closed_at, "slow sockets closed before the deadline"

                last_opened = slow.opened_at[-1]
                remaining = last_opened + HANDSHAKE_TIMEOUT + MARGIN - time.monotonic()
                await asyncio.wait_for(slow.all_closed.wait(), max(remaining, 0.1))

                # The upgraded peers are not subject to the handshake deadline.
                await alice.sync()
                await bob.sync()
        except asyncio.TimeoutError:
            raise AssertionError(
                f"{SLOW_SOCKETS - len(slow.closed_at)} slow sockets still open "
                f"{HANDSHAKE_TIMEOUT + MARGIN} s after they connected"
            ) from None
        finally:
            if dripper is not None:
                dripper.cancel()
            slow.close()
        assert not slow.answered, slow.answered[:3]
        lifetimes = [slow.closed_at[i] - slow.opened_at[i] for i in range(SLOW_SOCKETS)]
        assert min(lifetimes) >= HANDSHAKE_TIMEOUT - 0.1, min(lifetimes)
        assert max(lifetimes) <= HANDSHAKE_TIMEOUT + MARGIN, max(lifetimes)

    run(scenario(), timeout=30)


# --- request head limits -------------------------------------------------------


def send_head(port: int, path: str, extra: list[str], *, end: bool = True) -> Response:
    """Send an upgrade request with *extra* header lines; return the response."""
    headers = websocket_headers()
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()] + extra
    head = "\r\n".join(lines) + "\r\n" + ("\r\n" if end else "")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(head.encode())
        return read_response(sock)


def read_response(sock: socket.socket) -> Response:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without a response; got {data!r}"
        data += chunk
    status_line = data.split(b"\r\n", 1)[0].decode()
    return Response(int(status_line.split(" ")[1]), {})


BASE_HEADERS = 5
"""Host and the four WebSocket headers of every request here."""


@pytest.fixture(scope="module", params=["1", "2"], ids=["1-worker", "2-workers"])
def head_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server per worker count: with two, the request line is peeked at to route it."""
    srv = launch(tmp_path_factory.mktemp("server"), "--workers", request.param)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.output(), srv.output()


@pytest.mark.parametrize(
    ("path", "extra", "status"),
    [
        ("/ws/h", ["X-Long: " + "a" * 8170], 101),
        ("/ws/h", ["X-Long: " + "a" * 8200], 431),
        ("/ws/h", [f"X-H{i}: v" for i in range(128 - BASE_HEADERS)], 101),
        ("/ws/h", [f"X-H{i}: v" for i in range(129 - BASE_HEADERS)], 431),
        ("/ws/h?pad=" + "a" * 8100, [], 101),
        ("/ws/h?pad=" + "a" * 8200, [], 414),
        ("/ws/" + "a" * 8200, [], 414),
    ],
    ids=[
        "header-line-under-8KiB",
        "header-line-over-8KiB",
        "128-headers",
        "129-headers",
        "request-line-under-8KiB",
        "request-line-over-8KiB",
        "long-path",
    ],
)
def test_request_head_limits(head_server: Server, path: str, extra: list[str], status: int) -> None:
    assert send_head(head_server.port, path, extra).status == status


def test_head_without_its_end_over_16KiB_is_431(head_server: Server) -> None:
    extra = [f"X-H{i}: " + "b" * 1000 for i in range(17)]
    assert send_head(head_server.port, "/ws/h", extra, end=False).status == 431


def test_head_limit_does_not_depend_on_how_the_bytes_arrive(server: Server) -> None:
    """A complete 20 KiB head gets the same answer whether it arrives in one
    read or in two (the first over 16 KiB without the head's end)."""
    lines = ["GET /ws/h HTTP/1.1", f"Host: 127.0.0.1:{server.port}"]
    lines += [f"{name}: {value}" for name, value in websocket_headers().items()]
    lines += [f"X-H{i}: " + "b" * 1000 for i in range(20)]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    assert len(head) > 20000
    statuses = []
    for split in (None, 17000):
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            if split is None:
                sock.sendall(head)
            else:
                sock.sendall(head[:split])
                time.sleep(0.2)  # lets the server read the first part on its own
                sock.sendall(head[split:])
            statuses.append(read_response(sock).status)
    assert statuses[0] == statuses[1], f"one read: {statuses[0]}, two reads: {statuses[1]}"


def test_request_limits_leave_the_server_healthy(server: Server) -> None:
    """After oversized heads, a normal client still joins (see the tests above)."""
    send_head(server.port, "/ws/h", ["X-Long: " + "a" * 9000])
    send_head(server.port, "/ws/h", [f"X-H{i}: v" for i in range(300)])

    async def scenario() -> None:
        async with Peers() as peers:
            await peers.join(server.url("after-abuse"))

    run(scenario())
