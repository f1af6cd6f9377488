"""A TCP proxy between a test's client and the server, for real network
faults: reset every connection (RST both ways), blackhole them (stop
forwarding but keep the sockets open, as a dead route does), both ways or
in one direction only, or inject bytes towards the clients (a server gone
mad). It runs in a
thread of its own, so blocking and asyncio tests alike can use it; the
faults are carried out by that thread, between two reads.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import struct
import threading


class Proxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target``."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        #: The directions not forwarded: "up" (client to server), "down".
        self.blackholed: frozenset[str] = frozenset()
        self.commands: queue.Queue[tuple[str, threading.Event]] = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def serve(self) -> None:
        #: Each socket with the one it forwards to.
        peers: dict[socket.socket, socket.socket] = {}
        clients: set[socket.socket] = set()
        while not self.stopping.is_set():
            while not self.commands.empty():
                command, done = self.commands.get()
                if command == "reset":
                    for sock in list(peers):
                        with contextlib.suppress(OSError):
                            linger = struct.pack("ii", 1, 0)
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                        sock.close()
                    peers.clear()
                    clients.clear()
                elif command.startswith("inject:"):
                    for sock in clients:
                        with contextlib.suppress(OSError):
                            sock.sendall(command[len("inject:") :].encode("latin-1"))
                done.set()
            # A blackholed direction is not read: its bytes wait in the
            # kernel's buffers, and the sender's TCP sees a live connection.
            blocked = self.blackholed
            watched = [self.listener]
            watched += [
                sock for sock in peers if ("up" if sock in clients else "down") not in blocked
            ]
            readable, _, _ = select.select(watched, [], [], 0.02)
            for sock in readable:
                if sock is self.listener:
                    client, _ = self.listener.accept()
                    server = socket.create_connection(("127.0.0.1", self.target))
                    peers[client], peers[server] = server, client
                    clients.add(client)
                    self.accepted += 1
                    continue
                other = peers.get(sock)
                if other is None:
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if data:
                    with contextlib.suppress(OSError):
                        other.sendall(data)
                    continue
                for end in (sock, other):
                    peers.pop(end, None)
                    clients.discard(end)
                    end.close()
        for sock in peers:
            sock.close()

    def _do(self, command: str) -> None:
        done = threading.Event()
        self.commands.put((command, done))
        if not done.wait(5):
            raise RuntimeError(f"the proxy did not {command}")

    def reset(self) -> None:
        """Reset every connection, both ways (SO_LINGER 0, then close)."""
        self._do("reset")

    def inject(self, data: bytes) -> None:
        """Send ``data`` to every client, between two forwarded reads, as if
        the server had sent it."""
        self._do("inject:" + data.decode("latin-1"))

    def blackhole(self, direction: str = "both") -> None:
        """Stop forwarding, keeping every socket open: "both" ways (both
        ends see a connection that went silent), "up" only (the client's
        bytes, pongs included, no longer reach the server) or "down" only
        (the server's no longer reach the client)."""
        if direction not in ("both", "up", "down"):
            raise ValueError(f"direction: {direction!r}")
        self.blackholed = frozenset(("up", "down") if direction == "both" else (direction,))

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(2)
        self.listener.close()
