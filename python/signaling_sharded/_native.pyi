"""The Rust core (``rust/python/``): the seam over ``rust/engine`` and
``rust/wire``. ``frame_events`` and ``message_answer`` exist only in builds
with the ``test-hooks`` feature (``make build``), not in released wheels."""

from collections.abc import Callable
from typing import Any, Protocol, final

__all__ = [
    "CLOSE_CODES",
    "MAX_METADATA_BYTES",
    "MAX_REQUEST_HEAD",
    "AskOp",
    "Hub",
    "JoinOp",
    "LeaveOp",
    "MetricsTable",
    "MoveOp",
    "Peer",
    "PublishOp",
    "RedisProtocol",
    "Request",
    "RequestReader",
    "UpdateOp",
    "frame_events",
    "message_answer",
    "query_values",
    "topic_hash",
    "topic_owner",
]

#: Largest request head read, in bytes; a longer one is answered 431.
MAX_REQUEST_HEAD: int
#: Largest metadata (the query's, a token's), in bytes of UTF-8.
MAX_METADATA_BYTES: int
#: The close codes the server sends, by name (``rust/wire/close.rs``).
CLOSE_CODES: dict[str, int]

class _Settings(Protocol):
    """What ``Hub`` reads of the server's ``Config``, by attribute."""

    @property
    def max_message_size(self) -> int: ...
    @property
    def max_queue_bytes(self) -> int: ...
    @property
    def ping_interval(self) -> float: ...
    @property
    def ping_timeout(self) -> float: ...
    @property
    def close_timeout(self) -> float: ...
    @property
    def max_peers_per_topic(self) -> int: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def rate_limit(self) -> float | None: ...
    @property
    def rate_burst(self) -> float | None: ...
    @property
    def stun_uris(self) -> tuple[str, ...]: ...
    @property
    def turn_uris(self) -> tuple[str, ...]: ...
    @property
    def turn_secret(self) -> str | None: ...
    @property
    def turn_ttl(self) -> int: ...
    @property
    def redis_prefix(self) -> str: ...
    @property
    def resume_window(self) -> float: ...
    @property
    def resume_secret(self) -> str | None: ...

@final
class JoinOp:
    """Cluster work: add local peer ``peer`` to ``topic``; with
    ``snapshot``, the hub waits for the topic's members."""

    @property
    def topic(self) -> str: ...
    @property
    def peer(self) -> str: ...
    @property
    def metadata(self) -> str | None: ...
    @property
    def snapshot(self) -> bool: ...

@final
class UpdateOp:
    """Cluster work: replace the metadata of local peer ``peer`` of
    ``topic`` (None: none)."""

    @property
    def topic(self) -> str: ...
    @property
    def peer(self) -> str: ...
    @property
    def metadata(self) -> str | None: ...

@final
class LeaveOp:
    """Cluster work: remove ``peer`` from ``topic``."""

    @property
    def topic(self) -> str: ...
    @property
    def peer(self) -> str: ...
    @property
    def reason(self) -> str:
        """Why it left (as ``signaling_peers_left_total`` names it), or
        ``"node_lost"``: a remote peer found gone with its node."""

@final
class AskOp:
    """Cluster work: publish ``message`` (a resume asked of another node,
    for connection ``conn``) to the node holding ``peer`` of ``topic``;
    whether it arrived goes back with ``Hub.asked(conn, reached)``."""

    @property
    def topic(self) -> str: ...
    @property
    def peer(self) -> str: ...
    @property
    def conn(self) -> int: ...
    @property
    def message(self) -> bytes: ...

@final
class MoveOp:
    """Cluster work: move local peer ``peer`` of ``topic`` to node ``to``
    (its connection ``conn`` there); a move that could not be goes back
    with ``Hub.move_failed(peer)``."""

    @property
    def topic(self) -> str: ...
    @property
    def peer(self) -> str: ...
    @property
    def to(self) -> str: ...
    @property
    def conn(self) -> int: ...

@final
class PublishOp:
    """Cluster work: the encoded ``PUBLISH`` (``command``) of a message to
    another node's inbox. A relay (``is_relay``) that reaches nobody goes
    back with ``Hub.undeliverable(op, ...)``."""

    @property
    def command(self) -> bytes: ...
    @property
    def is_relay(self) -> bool: ...

@final
class Hub:
    """One worker's peers and topics; see ``rust/engine.rs``."""

    def __new__(
        cls,
        config: _Settings,
        on_left: Callable[[str, str, str], object],
        *,
        on_session: Callable[[str, str, str], object] | None = None,
        metrics: MetricsTable | None = None,
        worker: int = 0,
        cluster_node: str | None = None,
        on_cluster: Callable[[list[Any]], object] | None = None,
        on_joined: Callable[[str, str, str | None], object] | None = None,
        on_updated: Callable[[str, str, str | None], object] | None = None,
    ) -> Hub:
        """A hub with the settings of ``config``, read once. ``on_left`` and
        ``on_session`` are called with ``(peer, topic, reason or event)``
        when a peer leaves, and when a resumable session is ``"suspended"``
        or ``"resumed"`` (or ``"joined"``: a resume another node could not
        honour started a new session). ``metrics`` is
        the server's table and ``worker`` this worker's row; in cluster
        mode, ``cluster_node`` names the node and ``on_cluster`` takes its
        work for Redis, in order: ``JoinOp``, ``UpdateOp``, ``LeaveOp``, ``PublishOp``,
        ``AskOp``, ``MoveOp``. ``on_joined`` is called with ``(peer, topic,
        metadata JSON or None)`` when a peer joins (a resume is no join),
        before ``on_left`` is for it; ``on_updated`` the same when a peer
        changes its metadata."""
    def join(
        self,
        transport: Any,
        topic: str,
        metadata: str | None = None,
        *,
        resumable: bool = False,
        resume: str | None = None,
        seen: int | None = None,
        waited: float = 0.0,
        metadata_locked: bool = False,
        head: bytes = ...,
    ) -> Peer:
        """Add the upgraded connection on ``transport`` to ``topic``.

        Writes ``welcome`` and ``peer-list`` to it and ``peer-joined`` to the
        others; the caller then installs the returned protocol with
        ``transport.set_protocol(peer)``. Over ``max_peers_per_topic`` or
        ``max_connections`` the connection is refused instead: it is sent the
        ``error`` and close code, and ``Peer.refused`` names the error.
        With ``resumable``, the session outlives a lost connection; with
        ``resume`` (a token) and ``seen``, it takes that session over if it
        can (``Peer.resumed``), else it is a new peer. ``waited``: seconds
        since the connection was accepted (the join latency histogram counts
        from there). ``metadata_locked``: its token fixed the metadata, so
        ``update-metadata`` is ``forbidden``. ``head`` (the 101 response) is
        written first, in the same write as ``welcome``.
        """
    def refuse(self, transport: Any, reason: str, *, head: bytes = ...) -> Peer:
        """Refuse the upgraded connection on ``transport`` with ``reason``
        (``"unauthorized"``, ``"invalid_topic"``, ``"invalid_metadata"``,
        ``"topic_full"``, ``"server_full"``): ``head`` (the 101 response),
        the ``error``, then the close code. An unknown reason raises
        ValueError."""
    def defer_writes(
        self, call_soon: Callable[[Callable[[], object]], object], high_water: int
    ) -> None:
        """From now on, writes and closes wait for ``flush``, which
        ``call_soon(hub.flush)`` schedules when the first one waits: what
        one event loop iteration sends a connection goes out in one write.
        Once a connection has been sent more than ``high_water`` bytes (the
        transports' high-water mark) since the last flush, the call that
        did it flushes before it returns, so that the transport can pause.
        A second call raises ValueError."""
    def flush(self) -> None:
        """Make the writes and closes waiting since the last flush."""
    def tick(self, part: int = 0, parts: int = 1) -> None:
        """Send due pings; close peers whose ping or close timed out; of
        part ``part`` of ``parts`` of the connections (all, by default;
        each connection is always in the same part). Process metrics are
        sampled with part 0."""
    def close_all(self, code: int, reason: str) -> None:
        """Start closing every peer with ``code``."""
    def abort_all(self) -> None:
        """Reset every connection still open."""
    def connection_count(self) -> int: ...
    def peer_count(self) -> int: ...
    def topic_count(self) -> int: ...
    def count_handshake_failure(self, reason: str) -> None:
        """Count a connection that did not become a peer, by HTTP status or
        reason (``"timeout"``, ``"404"``, ``"unauthorized"``, ...); an
        unknown label raises ValueError."""
    def count_handoff(self, result: str) -> None:
        """Count a hand-off: ``"sent"``, ``"failed"``, ``"received"``,
        ``"refused"``; an unknown label raises ValueError."""
    def count_webhook_events(self, result: str, n: int) -> None:
        """Count ``n`` webhook events: ``"sent"``, ``"overflow"`` or ``"expired"``."""
    def count_webhook_request(self, result: str) -> None:
        """Count a webhook request: ``"ok"`` or ``"failed"``."""
    def set_webhook_queued(self, queued: int) -> None:
        """Set how many webhook events wait to be sent from this worker."""
    def admin_topics(self) -> list[tuple[str, int]]:
        """Admin API: this worker's topics and their peer counts."""
    def admin_peers(self, topic: str) -> list[tuple[str, str | None, int, bool]] | None:
        """Admin API: the peers of ``topic`` here, oldest first, as ``(id,
        metadata JSON or None, since in Unix milliseconds, suspended)``;
        None if it has none here."""
    def kick(self, topic: str, peer: str) -> str | None:
        """Admin API: remove ``peer`` from ``topic`` (``kicked``, close 4010);
        None when done, else what is missing: ``"topic"`` or ``"peer"``."""
    def server_message(
        self, topic: str, payload: str, to: str | None = None
    ) -> tuple[int, str | None]:
        """Admin API: send a ``server-message`` with ``payload`` (JSON text)
        to ``to`` or every peer of ``topic``: how many it reached, and what
        is missing (``"topic"``, ``"peer"``, ``"payload"``) if anything."""
    def metrics_text(self) -> str:
        """Every worker's metrics in the Prometheus text format."""
    def set_cluster_connected(self, connected: bool, lost: bool = True) -> None:
        """Cluster mode: whether this worker is linked to Redis (a metric);
        losing the link is counted unless ``lost`` is false (a shutdown)."""
    def attach_redis(
        self,
        transport: Any,
        on_replies: Callable[[bytes, list[str]], object],
        on_lost: Callable[[Exception | None], object],
        pause: float = 0.0,
        call_later: Callable[..., object] | None = None,
    ) -> RedisProtocol:
        """Cluster mode: the hub publishes to Redis on ``transport`` (the
        writer connection), whose protocol the caller sets to the one
        returned. The server's own commands go through ``redis_write``;
        their replies to ``on_replies(raw, errors)``: whole RESP, in order,
        and the error texts Redis answered publishes with. With ``pause``
        (seconds), writes are kept about that far apart (the event loop's
        timers count whole milliseconds): what comes sooner after a write
        waits for ``call_later(seconds, hub.flush_redis)``, unless 64 KiB
        wait; what comes after a quiet spell of ``pause`` goes at once. A
        negative ``pause``, or one without ``call_later``, raises
        ValueError."""
    def flush_redis(self) -> None:
        """Cluster mode: write what waits for Redis now (its pause is over)."""
    def detach_redis(self) -> None:
        """Cluster mode: the writer connection is gone; the relays it had not
        written or seen answered are ``dropped`` to their senders."""
    def redis_write(self, data: bytes, replies: int) -> bool:
        """Cluster mode: writes ``data`` (commands with ``replies`` replies)
        after what was published before; False if detached."""
    def redis_busy(self) -> bool:
        """Cluster mode: whether anything waits to be written to the writer
        or answered on it."""
    def redis_stalled(self) -> float:
        """Cluster mode: seconds since the writer last made progress while
        replies are awaited; 0.0 when none is."""
    def inbox(
        self,
        transport: Any,
        on_other: Callable[[bytes], object],
        on_lost: Callable[[Exception | None], object],
        server_kinds: bytes,
    ) -> RedisProtocol:
        """Cluster mode: the protocol of the inbox connection on ``transport``.
        Messages go to the hub, except those whose first byte is in
        ``server_kinds``: those and every other reply go to
        ``on_other(reply)``, whole RESP, in order with the messages."""
    def asked(self, conn: int, reached: bool) -> None:
        """Cluster mode: whether the resume asked for connection ``conn``
        (``AskOp``) reached the session's node; if not, it starts afresh."""
    def move_failed(self, peer: str) -> None:
        """Cluster mode: Redis did not move ``peer`` (``MoveOp``): its
        session ends."""
    def snapshot(
        self,
        topic: str,
        version: int | None = None,
        members: list[tuple[str, str, str | None]] | None = None,
    ) -> None:
        """Cluster mode: the other nodes' members of ``topic`` at ``version``
        as ``(peer, node, metadata)``; no version: Redis could not be asked."""
    def greet_waiting(self, topic: str) -> None:
        """Cluster mode: greet the connections waiting for ``topic``'s
        snapshot with what is known; the snapshot completes their view."""
    def undeliverable(self, op: PublishOp, unreachable: bool) -> None:
        """Cluster mode: the relay ``op`` published reached nobody
        (``unreachable``), or was not sent."""
    def local_members(self) -> list[tuple[str, list[tuple[str, str | None]]]]:
        """Cluster mode: each followed topic with its local peers."""
    def begin_resync(self, forgot: bool = False) -> None:
        """Cluster mode: hold presence events until each topic's snapshot;
        ``forgot``: Redis lost its data (members missing from the snapshots
        are doubted for a while before they are told as left)."""
    def remote_nodes(self) -> list[str]:
        """Cluster mode: the other nodes holding members of this node's topics."""

@final
class MetricsTable:
    """The metrics table all processes of a server map: a row per worker."""

    def __new__(cls, fd: int, workers: int) -> MetricsTable:
        """Map the table in the file open as ``fd`` (still the caller's)."""
    @staticmethod
    def size(workers: int) -> int:
        """Bytes a table of ``workers`` rows needs."""
    def set_up(self, worker: int, up: bool) -> None:
        """Mark ``worker`` running, or gone (its gauges drop to zero)."""
    def count_restart(self, worker: int) -> None: ...
    def render(self) -> str: ...

@final
class Peer:
    """The asyncio protocol of an upgraded connection."""

    @property
    def peer_id(self) -> str | None:
        """The peer's id; None for a refused connection."""
    @property
    def resumed(self) -> bool:
        """Whether it resumed a session (``peer_id`` is the session's)."""
    @property
    def refused(self) -> str | None:
        """The error code a refused connection was sent, else None."""
    def connection_made(self, _transport: Any) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool: ...
    def connection_lost(self, _exc: BaseException | None = None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...

@final
class RedisProtocol:
    """The asyncio protocol of the cluster's writer (``Hub.attach_redis``)
    or inbox (``Hub.inbox``) connection."""

    def connection_made(self, _transport: Any) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool: ...
    def connection_lost(self, exc: BaseException | None = None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...

def topic_hash(topic: str) -> int:
    """The stable 64-bit hash of ``topic`` (SipHash-1-3 under a fixed key)."""

def topic_owner(topic: str, workers: int) -> int:
    """The index of the worker that owns ``topic`` among ``workers``."""

@final
class Request:
    """The request that opened a connection, read by ``RequestReader.read``.

    ``status`` is 0 when the request may be served; otherwise answer it
    with ``status``, ``reason`` as the body and ``headers``, then close.
    ``joins`` marks a request to ``/ws/{topic}``: a valid upgrade has
    ``accept`` (its ``Sec-WebSocket-Accept``) and either ``topic`` or
    ``invalid`` (the error to refuse it with after the upgrade).
    """

    @property
    def head_length(self) -> int: ...
    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str: ...
    @property
    def headers(self) -> list[tuple[str, str]]: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def authorization(self) -> str | None: ...
    @property
    def origin(self) -> str | None: ...
    @property
    def joins(self) -> bool: ...
    @property
    def topic(self) -> str | None: ...
    @property
    def invalid(self) -> str | None: ...
    @property
    def metadata(self) -> str | None: ...
    @property
    def token(self) -> str | None: ...
    @property
    def resumable(self) -> bool: ...
    @property
    def resume(self) -> str | None: ...
    @property
    def seen(self) -> int | None: ...
    @property
    def accept(self) -> str | None: ...
    @property
    def query(self) -> str:
        """The target's query, without the ``?``."""
    @property
    def content_length(self) -> int | None: ...
    @property
    def bad_length(self) -> bool:
        """``Content-Length`` sent but unusable (repeated, not a number, or
        with ``Transfer-Encoding``)."""
    @property
    def admin(self) -> str | None:
        """A request under ``/admin/v1/topics/{topic}``: the path after the
        topic; ``topic`` is set when valid, else ``invalid``."""

@final
class RequestReader:
    """Reads requests with one Origin allow-list (None: any origin)."""

    def __new__(cls, origins: list[str] | None = None) -> RequestReader: ...
    def read(self, data: bytes) -> Request | None:
        """The request at the start of ``data``, everything read from the
        connection so far; None while its head is incomplete."""

def query_values(query: str) -> dict[str, str] | None:
    """A query's parameters, percent-decoded (the first of a repeated name
    counts); None if an escape or the UTF-8 is invalid."""

def frame_events(data: bytes, max_message: int) -> tuple[list[tuple[str, Any]], int | None]:
    """For tests: the events read from ``data`` (client frames) as
    ``(kind, value)`` pairs (``text``: str, ``binary``: None, ``ping``: bytes,
    ``pong``: None, ``close``: int or None), and the close code of the fault
    that stopped reading, or None."""

def message_answer(text: str) -> tuple[str, str | None, str | None]:
    """For tests: ``("relay", type, msgId)``, ``("ping", None, msgId)`` or
    ``("error", code, msgId)`` for one client text message; ``msgId`` is the
    raw JSON text the server would echo."""
