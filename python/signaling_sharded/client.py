"""An asyncio client for the signaling server.

`SignalingClient` joins one topic, keeps the list of the other peers in it,
relays offers, answers and ICE candidates to them, and reconnects with
exponential backoff when the connection is lost::

    import asyncio

    from signaling_sharded.client import PeerJoined, Relay, SignalingClient

    async def main() -> None:
        async with SignalingClient("ws://127.0.0.1:8081", "room-1") as client:
            print("I am", client.self_id, "and I see", client.peers)
            for peer_id in client.peers:
                await client.offer(peer_id, {"sdp": "v=0..."}, msg_id="o-1")
            async for event in client:
                if isinstance(event, PeerJoined):
                    print("joined:", event.peer_id, event.metadata)
                elif isinstance(event, Relay) and event.type == "answer":
                    print("answer from", event.sender, event.payload)

    asyncio.run(main())

Events come out of ``async for event in client`` in the order the server
sent them: `PeerJoined`, `PeerLeft`, `Relay` (offer, answer, ice-candidate),
`Error`, `Pong`, and around a reconnect `Disconnected` then `Reconnected`.

`peers` is exact: the ``peer-list`` plus every ``peer-joined`` minus every
``peer-left``. It is updated as messages arrive, so it can be ahead of the
event being handled. After a reconnect the server assigns a new `self_id`
and every other peer that reconnected has a new id too; the client then
yields a `PeerLeft` for each peer no longer present, a `PeerJoined` for each
new one, and finally `Reconnected`. Applying the presence events in order to
the view you started from always gives the current view.

While disconnected, sending raises `NotConnected`: nothing is buffered, since
an offer relayed to a peer id that is gone after the reconnect would be
meaningless. The close codes 4001 (unauthorized), 4009 (topic full) and 4400
(an invalid topic or metadata), and an HTTP refusal of the upgrade other
than 429 or 5xx, end the client with `SignalingClosed` or
`SignalingRefused`: retrying would not help.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from signaling_sharded._native import CLOSE_CODES

__all__ = [
    "RELAY_TYPES",
    "Broadcast",
    "Disconnected",
    "Error",
    "Event",
    "NotConnected",
    "PeerJoined",
    "PeerLeft",
    "PeerUpdated",
    "Pong",
    "Reconnected",
    "Relay",
    "Resumed",
    "ServerMessage",
    "SignalingClient",
    "SignalingClosed",
    "SignalingError",
    "SignalingRefused",
]

RELAY_TYPES = ("offer", "answer", "ice-candidate")
"""The message types the server relays to the peer named in ``to``
(besides those its operator allows with ``--relay-type``)."""

NOT_RELAYS = frozenset(("ping", "broadcast", "update-metadata"))
"""Types a client sends that are not relays to one peer."""

FINAL_CLOSE_CODES = frozenset(
    CLOSE_CODES[name] for name in ("UNAUTHORIZED", "TOPIC_FULL", "KICKED", "BAD_REQUEST")
)
"""Close codes after which reconnecting cannot succeed or is not wanted:
unauthorized, topic full, kicked by the application's backend, and an
invalid topic or metadata."""


# --- events ------------------------------------------------------------------


@dataclass(frozen=True)
class PeerJoined:
    """A peer joined the topic. `metadata` is None when it gave none."""

    peer_id: str
    metadata: Any = None


@dataclass(frozen=True)
class PeerUpdated:
    """A peer changed its metadata (None: it has none now)."""

    peer_id: str
    metadata: Any = None


@dataclass(frozen=True)
class PeerLeft:
    """A peer left the topic."""

    peer_id: str


@dataclass(frozen=True)
class Relay:
    """An offer, answer or ice-candidate that the peer `sender` sent to us
    (or another type the server's operator allows)."""

    type: str
    sender: str
    payload: Any
    msg_id: str | None = None


@dataclass(frozen=True)
class Broadcast:
    """A message the peer `sender` sent to the whole topic."""

    sender: str
    payload: Any
    msg_id: str | None = None


@dataclass(frozen=True)
class Error:
    """An ``error`` message from the server (an event, not an exception).

    `msg_id` is the id of the message that caused it, when that had one;
    `missed`, for a ``dropped`` broadcast, how many peers missed it.
    """

    code: str
    message: str
    msg_id: str | None = None
    missed: int | None = None


@dataclass(frozen=True)
class ServerMessage:
    """A ``server-message``: the application's backend speaking, through
    the server's admin API; ``payload`` is whatever JSON it sent."""

    payload: Any


@dataclass(frozen=True)
class Pong:
    """The server's answer to `SignalingClient.ping`."""

    msg_id: str | None = None


@dataclass(frozen=True)
class Disconnected:
    """The connection was lost with this close code (1006: dropped); reconnecting."""

    code: int
    reason: str = ""


@dataclass(frozen=True)
class Resumed:
    """Connected again, and the session with it: the same `self_id`, and
    every message sent meanwhile follows this event; the other peers saw
    nothing, so the view is unchanged."""

    self_id: str


@dataclass(frozen=True)
class Reconnected:
    """Connected again, with a new `self_id`; `peers` is the view from now on."""

    self_id: str
    peers: Mapping[str, Any] = field(default_factory=dict)


Event = (
    PeerJoined
    | PeerUpdated
    | PeerLeft
    | Relay
    | Broadcast
    | ServerMessage
    | Error
    | Pong
    | Disconnected
    | Reconnected
    | Resumed
)


# --- exceptions --------------------------------------------------------------


class SignalingError(Exception):
    """Base class of this module's exceptions."""


class NotConnected(SignalingError):
    """Sending while there is no connection (reconnecting, or closed)."""


class SignalingClosed(SignalingError):
    """The server closed the connection and the client will not reconnect.

    `error` is the ``error`` message that the server sent just before the
    close, if any (``unauthorized`` before 4001, ``topic_full`` before 4009,
    ``invalid_topic`` or ``invalid_metadata`` before 4400).
    """

    def __init__(self, code: int, reason: str = "", error: Error | None = None) -> None:
        detail = error.message if error is not None else reason
        super().__init__(f"connection closed with code {code}" + (f": {detail}" if detail else ""))
        self.code = code
        self.reason = reason
        self.error = error


class SignalingRefused(SignalingError):
    """The server answered the upgrade request with this HTTP status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"server refused the WebSocket upgrade with HTTP {status}")
        self.status = status

    @property
    def retryable(self) -> bool:
        """True for statuses that may go away: 429 and 5xx (e.g. 503 while draining)."""
        return self.status == 429 or self.status >= 500


class _End:
    """Queued last: the iteration is over."""


_END = _End()
_TRANSIENT_ERRORS = (OSError, asyncio.TimeoutError, TimeoutError, WebSocketException)


# --- the client --------------------------------------------------------------


class SignalingClient:
    """A connection to one topic of a signaling server.

    *server_url* is the server's base url, ``ws://host:port`` or
    ``wss://host/prefix``; the client connects to ``{server_url}/ws/{topic}``
    with the topic percent-encoded. *metadata* is any JSON value shown to the
    other peers (None: no metadata). *token* is sent as an
    ``Authorization: Bearer`` header, which keeps it out of url logs.

    With *reconnect* (the default), a lost connection is retried after
    ``uniform(0, min(cap, base * 2**attempt))`` seconds, *backoff* being
    ``(base, cap)``. The first connection (`connect`, or ``async with``) is
    attempted once and raises on failure. *open_timeout* bounds each attempt,
    including the wait for ``welcome`` and ``peer-list``.
    """

    def __init__(
        self,
        server_url: str,
        topic: str,
        *,
        metadata: Any = None,
        token: str | None = None,
        reconnect: bool = True,
        backoff: tuple[float, float] = (0.5, 30.0),
        open_timeout: float = 10.0,
        resumable: bool = True,
    ) -> None:
        parts = urlsplit(server_url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise ValueError(f"expected a ws:// or wss:// url, got {server_url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"the server url takes no query nor fragment: {server_url!r}")
        if not topic:
            raise ValueError("the topic must not be empty")
        base, cap = backoff
        if not 0 < base <= cap:
            raise ValueError(f"backoff must be (base, cap) with 0 < base <= cap, got {backoff}")
        self.topic = topic
        self.url = f"{server_url.rstrip('/')}/ws/{quote(topic, safe='')}"
        self._query: dict[str, str] = {}
        if metadata is not None:
            self._query["metadata"] = json.dumps(metadata, separators=(",", ":"), allow_nan=False)
        if resumable:
            self._query["resumable"] = "1"
        self._headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        self._reconnect = reconnect
        self._backoff = (base, cap)
        self._open_timeout = open_timeout

        self._ws: ClientConnection | None = None
        self._self_id: str | None = None
        self._peers: dict[str, Any] = {}
        self._ice_servers: list[dict[str, Any]] = []
        self._resume_token: str | None = None
        #: Text messages received since the last ``welcome``, as the server
        #: numbers them: what a resume says arrived (``seen``).
        self._seen = 0
        self._events: asyncio.Queue[Event | _End] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._pings: dict[str, asyncio.Future[None]] = {}
        self._closing = False
        self._finished = False
        self._failure: BaseException | None = None

    # --- state ----------------------------------------------------------------

    @property
    def self_id(self) -> str:
        """Our id in the topic, as assigned by the last ``welcome``."""
        if self._self_id is None:
            raise NotConnected("not connected yet")
        return self._self_id

    @property
    def peers(self) -> dict[str, Any]:
        """A copy of the current view: every other peer's id and its metadata (or None)."""
        return dict(self._peers)

    @property
    def ice_servers(self) -> list[dict[str, Any]]:
        """``iceServers`` of the last ``welcome`` (RTCIceServer dicts); [] when absent."""
        return list(self._ice_servers)

    @property
    def connected(self) -> bool:
        """True while a connection is open (False while reconnecting and after close)."""
        return self._ws is not None

    # --- lifecycle --------------------------------------------------------------

    async def connect(self) -> None:
        """Connect once and wait for ``welcome`` and ``peer-list``.

        Raises `SignalingClosed` or `SignalingRefused` when the server turns
        the connection down, and `OSError` or `TimeoutError` when it cannot
        be reached.
        """
        if self._task is not None or self._closing:
            raise RuntimeError("connect() may be called once")
        ws, welcome, peer_list = await self._open()
        self._adopt(ws, welcome, peer_list)
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Close the connection and stop reconnecting; the iteration then ends."""
        self._closing = True
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_pings()
        self._finish(None)

    async def __aenter__(self) -> SignalingClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __aiter__(self) -> SignalingClient:
        return self

    async def __anext__(self) -> Event:
        """The next event; ends after `close`, raises if the client gave up."""
        if self._task is None and not self._finished:
            raise RuntimeError("connect() first, or use `async with`")
        item = await self._events.get()
        if isinstance(item, _End):
            self._events.put_nowait(item)  # so that every later call ends too
            if self._failure is not None:
                raise self._failure
            raise StopAsyncIteration
        return item

    # --- sending ----------------------------------------------------------------

    async def send(self, type: str, to: str, payload: Any, msg_id: str | None = None) -> None:
        """Relay *payload* (any JSON value) to the peer *to* as a message of *type*.

        The server answers problems with an `Error` event carrying *msg_id*.
        An empty *msg_id* counts as none: the server does not echo it.
        Raises `NotConnected` while there is no connection.
        """
        if type in NOT_RELAYS:
            raise ValueError(f"not a relay type: {type!r}")
        message: dict[str, Any] = {"type": type, "to": to, "payload": payload}
        if msg_id is not None:
            message["msgId"] = msg_id
        await self._send(message)

    async def update_metadata(self, metadata: Any) -> None:
        """Replace this peer's metadata (any JSON value of at most 1 KiB;
        None: none); every other peer gets `PeerUpdated`. The server
        refuses it (``forbidden``) when a token fixed the metadata."""
        await self._send({"type": "update-metadata", "metadata": metadata})

    async def broadcast(self, payload: Any, msg_id: str | None = None) -> None:
        """Send *payload* (any JSON value) to every other peer of the topic.

        A peer whose queue is full misses it; the server then answers one
        `Error` ``dropped`` whose `missed` says how many did. Raises
        `NotConnected` while there is no connection.
        """
        message: dict[str, Any] = {"type": "broadcast", "payload": payload}
        if msg_id is not None:
            message["msgId"] = msg_id
        await self._send(message)

    async def offer(self, to: str, payload: Any, msg_id: str | None = None) -> None:
        """Send an offer (typically ``{"type": "offer", "sdp": ...}``) to *to*."""
        await self.send("offer", to, payload, msg_id)

    async def answer(self, to: str, payload: Any, msg_id: str | None = None) -> None:
        """Send an answer to *to*."""
        await self.send("answer", to, payload, msg_id)

    async def ice_candidate(self, to: str, payload: Any, msg_id: str | None = None) -> None:
        """Send an ICE candidate (or an end-of-candidates marker) to *to*."""
        await self.send("ice-candidate", to, payload, msg_id)

    async def ping(self, timeout: float = 10.0) -> float:
        """Round-trip an application ``ping``; return the round-trip time in seconds.

        The `Pong` is also yielded as an event. Raises `TimeoutError` without
        an answer in *timeout* s, `NotConnected` if the connection is lost first.
        """
        msg_id = f"ping-{os.urandom(6).hex()}"
        answered = asyncio.get_running_loop().create_future()
        self._pings[msg_id] = answered
        started = time.monotonic()
        try:
            await self._send({"type": "ping", "msgId": msg_id})
            await asyncio.wait_for(answered, timeout)
        finally:
            self._pings.pop(msg_id, None)
        return time.monotonic() - started

    async def _send(self, message: Mapping[str, Any]) -> None:
        text = json.dumps(message, separators=(",", ":"), allow_nan=False)
        ws = self._ws
        if ws is None:
            if self._failure is not None:
                raise NotConnected(f"closed: {self._failure}") from self._failure
            raise NotConnected("closed" if self._closing or self._finished else "reconnecting")
        try:
            await ws.send(text)
        except ConnectionClosed as exc:
            raise NotConnected(f"connection lost (code {ws.close_code})") from exc

    # --- connecting ---------------------------------------------------------

    async def _open(self) -> tuple[ClientConnection, dict[str, Any], list[Any] | None]:
        """One attempt: connect, then read ``welcome`` and ``peer-list``."""
        query = dict(self._query)
        if self._resume_token is not None:
            query["resume"] = self._resume_token
            query["seen"] = str(self._seen)
        url = self.url + ("?" + urlencode(query, quote_via=quote) if query else "")
        try:
            ws = await connect(
                url,
                additional_headers=self._headers,
                compression=None,
                open_timeout=self._open_timeout,
                max_size=None,
            )
        except InvalidStatus as exc:
            raise SignalingRefused(exc.response.status_code) from exc
        try:
            return (ws, *await asyncio.wait_for(self._greeting(ws), self._open_timeout))
        except BaseException:
            ws.transport.abort()
            raise

    async def _greeting(self, ws: ClientConnection) -> tuple[dict[str, Any], list[Any] | None]:
        """``welcome`` and the ``peer-list`` after it; None for the list of
        a resumed session, which gets none (its view stands)."""
        welcome: dict[str, Any] | None = None
        error: Error | None = None
        try:
            while True:
                message = _parse(await ws.recv())
                kind = message.get("type")
                if kind == "welcome" and message.get("resumed") is True:
                    return message, None
                if kind == "welcome":
                    welcome = message
                elif kind == "peer-list" and welcome is not None:
                    peers = message.get("peers")
                    return welcome, peers if isinstance(peers, list) else []
                elif kind == "error":
                    error = _error(message)
        except ConnectionClosed:
            raise SignalingClosed(ws.close_code or 1006, ws.close_reason or "", error) from None

    def _adopt(
        self, ws: ClientConnection, welcome: dict[str, Any], peer_list: list[Any] | None
    ) -> None:
        """Make a new connection current. On a reconnect, queue `Resumed`
        (the session came back, the view stands), or the presence diffs."""
        self._ws = ws
        self._self_id = str(welcome["selfId"])
        servers = welcome.get("iceServers")
        self._ice_servers = servers if isinstance(servers, list) else []
        token = welcome.get("resumeToken")
        self._resume_token = token if isinstance(token, str) else None
        if peer_list is None:
            self._seen = 0  # the replayed messages are counted as they come
            self._events.put_nowait(Resumed(self._self_id))
            return
        self._seen = 1  # the peer-list
        view = {
            entry["id"]: entry.get("metadata")
            for entry in peer_list
            if isinstance(entry, dict) and isinstance(entry.get("id"), str)
        }
        if self._task is not None:  # a reconnect: tell what changed meanwhile
            for peer_id in self._peers.keys() - view.keys():
                self._events.put_nowait(PeerLeft(peer_id))
            for peer_id in view.keys() - self._peers.keys():
                self._events.put_nowait(PeerJoined(peer_id, view[peer_id]))
        self._peers = view

    # --- the background task -----------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                ws = self._ws
                if ws is None:
                    return
                await self._read(ws)
                if self._closing:
                    return
                self._ws = None
                self._fail_pings()
                code, reason = ws.close_code or 1006, ws.close_reason or ""
                if not self._reconnect or code in FINAL_CLOSE_CODES:
                    raise SignalingClosed(code, reason)
                self._events.put_nowait(Disconnected(code, reason))
                await self._reconnect_with_backoff()
        except Exception as exc:
            self._finish(exc)
        else:
            self._finish(None)

    async def _read(self, ws: ClientConnection) -> None:
        """Turn messages into events until the connection closes."""
        try:
            while True:
                data = await ws.recv()
                if isinstance(data, str):
                    self._seen += 1  # as the server numbers what it sends
                message = _parse(data)
                event = self._apply(message)
                if event is not None:
                    self._events.put_nowait(event)
        except ConnectionClosed:
            pass

    def _apply(self, message: dict[str, Any]) -> Event | None:
        kind = message.get("type")
        msg_id = message.get("msgId")
        msg_id = msg_id if isinstance(msg_id, str) else None
        if kind == "peer-joined":
            self._peers[message["peerId"]] = message.get("metadata")
            return PeerJoined(message["peerId"], message.get("metadata"))
        if kind == "peer-updated":
            if message["peerId"] in self._peers:
                self._peers[message["peerId"]] = message.get("metadata")
            return PeerUpdated(message["peerId"], message.get("metadata"))
        if kind == "peer-left":
            self._peers.pop(message["peerId"], None)
            return PeerLeft(message["peerId"])
        if kind == "broadcast":
            return Broadcast(message["from"], message.get("payload"), msg_id)
        if isinstance(kind, str) and isinstance(message.get("from"), str):
            # offer, answer, ice-candidate, or a type the operator allows
            return Relay(kind, message["from"], message.get("payload"), msg_id)
        if kind == "server-message":
            return ServerMessage(message.get("payload"))
        if kind == "error":
            return _error(message)
        if kind == "pong":
            answered = self._pings.get(msg_id) if msg_id is not None else None
            if answered is not None and not answered.done():
                answered.set_result(None)
            return Pong(msg_id)
        return None  # a message type this client does not know

    async def _reconnect_with_backoff(self) -> None:
        base, cap = self._backoff
        attempt = 0
        while True:
            await asyncio.sleep(random.uniform(0, min(cap, base * 2 ** min(attempt, 32))))
            attempt += 1
            try:
                ws, welcome, peer_list = await self._open()
            except SignalingClosed as exc:
                if exc.code in FINAL_CLOSE_CODES:
                    raise
                continue
            except SignalingRefused as exc:
                if not exc.retryable:
                    raise
                continue
            except _TRANSIENT_ERRORS:
                continue
            if self._closing:
                ws.transport.abort()
                return
            self._adopt(ws, welcome, peer_list)
            if peer_list is not None:
                self._events.put_nowait(Reconnected(self.self_id, dict(self._peers)))
            return

    def _fail_pings(self) -> None:
        for answered in self._pings.values():
            if not answered.done():
                answered.set_exception(NotConnected("connection lost before the pong"))
        self._pings.clear()

    def _finish(self, failure: BaseException | None) -> None:
        """End the iteration (once), raising *failure* from it if given."""
        if self._finished:
            return
        self._finished = True
        self._failure = failure
        self._ws = None
        self._fail_pings()
        self._events.put_nowait(_END)


def _parse(frame: str | bytes) -> dict[str, Any]:
    message = json.loads(frame)
    if not isinstance(message, dict):
        raise ValueError(f"the server sent a JSON value that is not an object: {frame!r}")
    return message


def _error(message: Mapping[str, Any]) -> Error:
    msg_id = message.get("msgId")
    missed = message.get("missed")
    return Error(
        str(message.get("code", "")),
        str(message.get("message", "")),
        msg_id if isinstance(msg_id, str) else None,
        missed if isinstance(missed, int) else None,
    )
