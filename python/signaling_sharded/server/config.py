"""Server settings, shared by the command line and the workers."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 8081
    workers: int = 1
    log_level: str = "info"
    #: Seconds between server pings; sent to clients as ``pingInterval``.
    ping_interval: float = 30.0
    #: Seconds a peer may stay silent after a ping before it is closed.
    ping_timeout: float = 10.0
    #: Largest message a client may send, in bytes; over it, close 1009.
    max_message_size: int = 64 * 1024
    #: Bytes a peer may have queued while it does not read.
    max_queue_bytes: int = 1024 * 1024
    #: Seconds a client has to complete the HTTP upgrade.
    handshake_timeout: float = 10.0
    #: Seconds a closing peer has to finish the close handshake.
    close_timeout: float = 2.0
    #: Seconds a drain (SIGTERM) may take before the rest is reset.
    drain_timeout: float = 8.0
    #: Peers a topic may hold; the next joiner is refused with 4009.
    max_peers_per_topic: int = 1000
    #: Connections a worker may hold; the next is refused with 4029.
    max_connections: int = 50_000
    #: Messages per second a connection may send (token bucket); None: no limit.
    rate_limit: float | None = None
    #: Burst of the token bucket; None: one second's worth.
    rate_burst: float | None = None
    #: HS256 secret that tokens are signed with; None: no auth.
    auth_secret: str | None = None
    #: STUN server URIs announced in welcome's iceServers.
    stun_uris: tuple[str, ...] = field(default_factory=tuple)
    #: TURN server URIs; each peer gets time-limited credentials for them.
    turn_uris: tuple[str, ...] = field(default_factory=tuple)
    #: coturn's static-auth-secret (use-auth-secret) the credentials derive from.
    turn_secret: str | None = None
    #: Seconds a TURN credential stays valid.
    turn_ttl: int = 86_400
    #: Origins allowed to connect; empty allows any.
    allowed_origins: tuple[str, ...] = field(default_factory=tuple)
    #: Cluster mode: the Redis shared by every server (redis://host:port/db).
    redis_url: str | None = None
    #: Prefix of every Redis key and channel, so clusters can share a Redis.
    redis_prefix: str = "signaling:"
    #: Seconds the writes to Redis are kept apart, so that a steady stream
    #: of relays takes fewer commands (one after a quiet spell goes at once).
    redis_flush_delay: float = 0.002
    #: Seconds a resumable session outlives its lost connection; 0: none.
    resume_window: float = 30.0
    #: The key of resume tokens; None: the supervisor draws one at start.
    resume_secret: str | None = None
    #: Bearer token of the admin API (``/admin/v1``); None: no admin API.
    admin_token: str | None = None
    #: Serve the admin API on its own address instead of the signaling
    #: port: this port (None: the signaling port), on this host (None: the
    #: signaling host).
    admin_port: int | None = None
    admin_host: str | None = None
    #: Broadcasts (PROTOCOL.md section 9): on; the largest, in bytes; each
    #: peer's rate (messages per second) and burst (None: two seconds').
    broadcast: bool = True
    max_broadcast_size: int = 16 * 1024
    broadcast_rate: float = 20.0
    broadcast_burst: float | None = None
    #: Unicast message types relayed like ``offer`` besides the three.
    relay_types: tuple[str, ...] = field(default_factory=tuple)
    #: Webhooks: the URLs events are POSTed to (none: off), the secret
    #: that signs them, and how many events each URL may have waiting.
    webhook_urls: tuple[str, ...] = field(default_factory=tuple)
    webhook_secret: str | None = None
    webhook_queue: int = 10_000
