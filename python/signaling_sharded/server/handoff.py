"""Passing accepted sockets between the workers of one server.

Every worker listens on a Unix ``SOCK_SEQPACKET`` socket in the abstract
namespace, ``\\0signaling-sharded.{group}.{index}``, where ``group`` names
the server (supervisor pid and port). A worker that accepted a connection
for a topic another worker owns sends it over its link to that worker: one
message per socket, carrying the file descriptor as ``SCM_RIGHTS`` and, as
payload, the handshake deadline and the bytes already read from it (the
request head, and whatever followed it), which the owner reads again.

Seqpacket rather than datagram: a datagram socket's receive queue is capped
at ``net.unix.max_dgram_qlen`` messages (10 by default), which a burst of
joins overflows; a connected seqpacket link is bounded by its send buffer
(hundreds of hand-offs) and keeps message boundaries.

``sendmsg``/``recvmsg`` are called directly rather than ``socket.send_fds``
and ``recv_fds``, which ignore their flags (CPython gh-128881): descriptors
are received with ``MSG_CMSG_CLOEXEC``, and a message whose descriptor the
kernel dropped (``MSG_CTRUNC``, at descriptor pressure) is detected. Every
descriptor received is either adopted or closed.
"""

from __future__ import annotations

import array
import contextlib
import enum
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from signaling_sharded._native import MAX_REQUEST_HEAD

#: Payload of a hand-off: the handshake deadline (time.monotonic(), which is
#: one system-wide clock on Linux), then the bytes read from the socket.
_PAYLOAD = struct.Struct("!d")
#: Most bytes read from a socket before it is handed off: a whole head, and
#: one byte more that makes a head without its end too large.
MAX_RECEIVED = MAX_REQUEST_HEAD + 1
_FD_SIZE = array.array("i").itemsize
#: Room for a few descriptors, so that a sender that (wrongly) sends more
#: than one is noticed and all of them are closed.
_ANCILLARY_SPACE = socket.CMSG_SPACE(4 * _FD_SIZE)
_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


def address(group: str, index: int) -> str:
    return f"\0signaling-sharded.{group}.{index}"


def _seqpacket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | _FLAGS)


def inbox_ready(group: str, index: int) -> bool:
    """Whether worker ``index`` of ``group`` listens for hand-offs."""
    with _seqpacket() as probe:
        try:
            probe.connect(address(group, index))
        except OSError:
            return False
    return True


class Drained(enum.Enum):
    """Why :meth:`Inbox.receive` has no socket to give."""

    EMPTY = "empty"
    CLOSED = "closed"


@dataclass(frozen=True)
class Arrival:
    """A socket handed over by another worker, with what it read of it."""

    sock: socket.socket
    deadline: float
    received: bytes


class Inbox:
    """Where worker ``index`` of ``group`` takes links from the others."""

    def __init__(
        self, group: str, index: int, backlog: int, on_refused: Callable[[], None] = lambda: None
    ) -> None:
        self.sock = _seqpacket()
        self.sock.bind(address(group, index))
        self.sock.listen(backlog)
        #: Called for each message refused (truncated, malformed).
        self.on_refused = on_refused

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept_links(self) -> list[socket.socket]:
        links: list[socket.socket] = []
        while True:
            try:
                link, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return links
            link.setblocking(False)
            links.append(link)

    def receive(self, link: socket.socket) -> Arrival | Drained | None:
        """The next socket waiting on ``link``; ``EMPTY`` when none is
        waiting, ``CLOSED`` when the sender closed the link, and None for a
        message refused (truncated, malformed; look again). One at a time,
        so that the caller can make room for each descriptor (at the
        descriptor limit the kernel drops a descriptor it has no room for)."""
        try:
            data, ancillary, flags, _ = link.recvmsg(
                _PAYLOAD.size + MAX_RECEIVED, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return Drained.EMPTY
        except OSError:
            return Drained.CLOSED
        fds = _descriptors(ancillary)
        if not data and not fds:
            return Drained.CLOSED
        if (
            flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC)
            or len(fds) != 1
            or len(data) < _PAYLOAD.size
        ):
            for fd in fds:
                _close_fd(fd)
            self.on_refused()
            return None
        (deadline,) = _PAYLOAD.unpack_from(data)
        try:
            sock = socket.socket(fileno=fds[0])
        except OSError:
            _close_fd(fds[0])
            self.on_refused()
            return None
        sock.setblocking(False)
        return Arrival(sock, deadline, data[_PAYLOAD.size :])

    def close(self) -> None:
        self.sock.close()


class Courier:
    """Sends sockets to the other workers of ``group``, over one link per
    worker, connected on first use and again after the worker restarted."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.links: dict[int, socket.socket] = {}

    def send(self, conn: socket.socket, owner: int, deadline: float, received: bytes) -> bool:
        """Hand ``conn`` to worker ``owner`` with the bytes ``received`` from
        it (at most ``MAX_RECEIVED``). On True the caller closes its copy;
        on False (the owner is gone, restarting or backlogged) it keeps it."""
        message = [_PAYLOAD.pack(deadline), received]
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))]
        for _attempt in range(2):
            link = self.links.get(owner) or self.connect(owner)
            if link is None:
                return False
            try:
                link.sendmsg(message, rights, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return False  # the owner is backlogged
            except OSError:
                # The owner restarted since the link was made: reconnect once.
                self.drop(owner)
                continue
            return True
        return False

    def connect(self, owner: int) -> socket.socket | None:
        link = _seqpacket()
        try:
            link.connect(address(self.group, owner))
        except OSError:
            link.close()
            return None
        self.links[owner] = link
        return link

    def drop(self, owner: int) -> None:
        link = self.links.pop(owner, None)
        if link is not None:
            link.close()

    def close(self) -> None:
        for owner in list(self.links):
            self.drop(owner)


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % _FD_SIZE])
    return list(fds)


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        socket.close(fd)
