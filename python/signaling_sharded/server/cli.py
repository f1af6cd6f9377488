"""The ``signaling-sharded`` command."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from signaling_sharded import __version__
from signaling_sharded.server.config import Config
from signaling_sharded.server.logs import configure, log


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: those it may run on (taskset, cpusets),
    capped by its cgroup's CPU quota (a container's ``--cpus``), rounded up."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cpu_quota(cgroup)
    if quota is not None:
        return max(1, min(cpus or 1, math.ceil(quota)))
    return cpus or 1


def cpu_quota(cgroup: Path) -> float | None:
    """The CPU quota of this process's cgroup in CPUs, or None for none:
    ``cpu.max`` (cgroup v2: "max 100000" or "150000 100000"), else
    ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` (v1; -1 for none)."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        value, every = int(quota), int(period)
    except ValueError:
        return None  # "max": no quota
    return value / every if value > 0 and every > 0 else None


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number: {text}")
    return value


#: Seconds --redis-flush-delay may hold the writes to Redis, joins
#: included: well below cluster.JOIN_WAIT, the time a joiner waits for
#: its topic's snapshot.
MAX_FLUSH_DELAY = 0.1


def flush_delay(text: str) -> float:
    value = non_negative_float(text)
    if value > MAX_FLUSH_DELAY:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_FLUSH_DELAY:g} seconds: {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 0 to 65535: {text!r}")
    return value


def nonempty(text: str) -> str:
    """A value that must not be empty: an empty secret would turn auth off,
    an empty URL cluster mode, silently (e.g. a template that expanded to
    nothing)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def redis_url(text: str) -> str:
    """A redis://, rediss:// or redis+sentinel:// URL. Not unix://: the
    cluster's connections are TCP (and a cluster is several machines).
    The URL is not repeated in the error: it may hold a password."""
    from urllib.parse import urlsplit

    from redis.connection import parse_url

    from signaling_sharded.server import sentinel

    try:
        if sentinel.is_sentinel_url(nonempty(text)):
            sentinel.parse(text)
            return text
        scheme = urlsplit(text).scheme.lower()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if scheme == "unix":
        raise argparse.ArgumentTypeError("unix:// is not supported: use redis:// or rediss://")
    try:
        parse_url(text)  # type: ignore[no-untyped-call]
    except ValueError:
        # redis-py's message may quote the password (urllib's on a bad port).
        raise argparse.ArgumentTypeError(
            "not a Redis URL: redis://[[user]:password@]host[:port][/db], rediss://..., or "
            "redis+sentinel://host[:port][,host[:port]...]/service[/db]"
        ) from None
    return text


def origin(text: str) -> str:
    """A browser Origin as browsers send it (``https://app.example``,
    ``http://localhost:3000``): a scheme and a host, no path, no slash at
    the end. The host's case and a default port are normalised away."""
    if text == "*":
        raise argparse.ArgumentTypeError(
            "'*' is not an origin; leave --allowed-origin out to allow any origin"
        )
    parts = urlsplit(text)
    if not (parts.scheme and parts.hostname) or parts.username or parts.password:
        raise argparse.ArgumentTypeError(f"{text!r} is not an origin such as https://app.example")
    if parts.path or parts.query or parts.fragment or text.endswith("/"):
        raise argparse.ArgumentTypeError(
            f"{text!r} has a path; an origin is scheme://host[:port], without a trailing slash"
        )
    try:
        port = parts.port
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} has an invalid port") from None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    if port is not None and DEFAULT_PORTS.get(parts.scheme.lower()) != port:
        host = f"{host}:{port}"
    return f"{parts.scheme.lower()}://{host}"


#: The port a browser leaves out of an Origin for its scheme.
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
ICE_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")


def ice_uri(text: str) -> str:
    """A STUN or TURN URI (RFC 7064, RFC 7065)."""
    if not text.lower().startswith(ICE_SCHEMES) or text.split(":", 1)[1] in ("", "//"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a STUN or TURN URI (stun:, stuns:, turn:, turns:)"
        )
    return text


ENV_PREFIX = "SIGNALING_"
LOG_LEVELS = ("debug", "info", "warning", "error")


def env_name(flag: str) -> str:
    """The environment variable of ``--some-flag``: ``SIGNALING_SOME_FLAG``."""
    return ENV_PREFIX + flag.removeprefix("--").upper().replace("-", "_")


@dataclass(frozen=True)
class InvalidEnvironment:
    """The default of a flag whose environment variable holds a bad value;
    reported unless the command line sets the flag."""

    variable: str
    message: str


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: ...)`` to a flag's help unless the help already
    says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, [], argparse.SUPPRESS, False):
            return text
        return super()._get_help_string(action)


class EnvArgumentParser(argparse.ArgumentParser):
    """Every ``--flag`` also takes its default from ``SIGNALING_FLAG`` (or
    from ``fallback_env``), so containers and service managers can
    configure the server without a command line. A repeatable flag takes a
    comma-separated list; the command line still wins. A bad value is
    reported naming the variable it came from."""

    def add_argument(self, *names: Any, **kwargs: Any) -> argparse.Action:
        flag = next((name for name in names if str(name).startswith("--")), None)
        fallback = kwargs.pop("fallback_env", None)
        if flag is not None and kwargs.get("action") not in ("version", "help"):
            variable = env_name(flag)
            for name in (variable, fallback):
                if name is not None and name in os.environ:
                    kwargs["default"] = self.from_environment(name, os.environ[name], kwargs)
                    break
            kwargs["help"] = f"{kwargs.get('help', '')} [env {variable}]"
        return super().add_argument(*names, **kwargs)

    @staticmethod
    def from_environment(variable: str, value: str, kwargs: dict[str, Any]) -> object:
        convert = kwargs.get("type") or str
        try:
            if kwargs.get("action") == "append":
                return [convert(item) for item in value.split(",") if item]
            converted = convert(value)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            return InvalidEnvironment(variable, f"{variable}={value!r}: {exc}")
        choices = kwargs.get("choices")
        if choices is not None and converted not in choices:
            return InvalidEnvironment(
                variable, f"{variable}={value!r}: choose from {', '.join(choices)}"
            )
        return converted

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        parsed = super().parse_args(args)
        for value in vars(parsed).values():
            if isinstance(value, InvalidEnvironment):
                self.error(value.message)
        return parsed

    def error(self, message: str) -> NoReturn:
        """One line, exit 2: a usage error names what is wrong, not the
        whole usage (``--help`` has it)."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


#: Fewest characters of an admin token: guessing it must not be practical.
MIN_ADMIN_TOKEN = 16


def admin_token(value: str) -> str:
    if len(value) < MIN_ADMIN_TOKEN or not value.isprintable() or " " in value:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_ADMIN_TOKEN} printable characters without spaces"
        )
    return value


#: What a relay type may be named: lowercase letters, digits, dashes.
RELAY_TYPE = re.compile(r"[a-z][a-z0-9-]{0,31}")
#: Message types of the protocol, which no relay type may take.
TAKEN_TYPES = (
    "offer",
    "answer",
    "ice-candidate",
    "ping",
    "broadcast",
    "update-metadata",
    "welcome",
    "peer-list",
    "peer-joined",
    "peer-left",
    "peer-updated",
    "error",
    "pong",
    "server-message",
)


def relay_type(text: str) -> str:
    if not RELAY_TYPE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a relay type is 1 to 32 lowercase letters, digits or dashes"
        )
    if text in TAKEN_TYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is already a message type")
    return text


#: Fewest characters of a webhook secret.
MIN_WEBHOOK_SECRET = 16


def webhook_url(text: str) -> str:
    """An http:// or https:// URL with a host."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} has an invalid port") from None
    return text


def webhook_secret(value: str) -> str:
    if len(value) < MIN_WEBHOOK_SECRET:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_WEBHOOK_SECRET} characters")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = EnvArgumentParser(
        prog="signaling-sharded",
        description=(
            "A WebRTC signaling server. Peers connect over WebSocket to /ws/{topic}, "
            "learn who else is in the topic, and relay offers, answers and ICE candidates "
            "to one named peer. Plain HTTP: GET /healthz, GET /readyz. "
            "'signaling-sharded token --help' mints auth tokens."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--host", type=nonempty, default=defaults.host, help="address to listen on")
    parser.add_argument(
        "--port",
        type=port_number,
        default=defaults.port,
        fallback_env="PORT",
        help=(f"TCP port to listen on; 0 picks a free one (default: $PORT, else {defaults.port})"),
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=usable_cpus(),
        help=(
            "worker processes; topics are sharded over them by a stable hash "
            "(default: the CPUs this process may use, capped by its cgroup's CPU quota)"
        ),
    )
    parser.add_argument(
        "--log-level",
        default=defaults.log_level,
        choices=LOG_LEVELS,
        help="JSON-lines logs on stdout at this level and above",
    )
    parser.add_argument(
        "--ping-interval",
        type=positive_float,
        default=defaults.ping_interval,
        help="seconds between WebSocket pings to each peer (sent as pingInterval in welcome)",
    )
    parser.add_argument(
        "--ping-timeout",
        type=positive_float,
        default=defaults.ping_timeout,
        help="seconds a peer may stay silent after a ping before it is disconnected",
    )
    parser.add_argument(
        "--max-message-size",
        type=positive_int,
        default=defaults.max_message_size,
        help="largest message a client may send, in bytes; larger ones close with 1009",
    )
    parser.add_argument(
        "--max-queue-bytes",
        type=positive_int,
        default=defaults.max_queue_bytes,
        help=(
            "bytes queued for a peer that does not read; past it relays to the peer are "
            "refused with 'dropped' and presence events disconnect it with 4008"
        ),
    )
    parser.add_argument(
        "--handshake-timeout",
        type=positive_float,
        default=defaults.handshake_timeout,
        help="seconds a client has to complete the HTTP upgrade",
    )
    parser.add_argument(
        "--max-peers-per-topic",
        type=positive_int,
        default=defaults.max_peers_per_topic,
        help="peers a topic may hold; the next joiner gets 'topic_full' and close 4009",
    )
    parser.add_argument(
        "--max-connections",
        type=positive_int,
        default=defaults.max_connections,
        help="connections a worker may hold; the next gets 'server_full' and close 4029",
    )
    parser.add_argument(
        "--rate-limit",
        type=positive_float,
        default=defaults.rate_limit,
        metavar="PER_SECOND",
        help=(
            "messages per second each connection may send (token bucket; default: no "
            "limit). Over it a message is dropped with 'rate_limited'; 10 violations "
            "within 10 s disconnect with 4008"
        ),
    )
    parser.add_argument(
        "--rate-burst",
        type=positive_float,
        default=defaults.rate_burst,
        metavar="MESSAGES",
        help="burst the rate limit allows (default: one second's worth)",
    )
    parser.add_argument(
        "--broadcast",
        choices=("on", "off"),
        default="on" if defaults.broadcast else "off",
        help="whether peers may broadcast to their whole topic (PROTOCOL section 9)",
    )
    parser.add_argument(
        "--max-broadcast-size",
        type=positive_int,
        default=defaults.max_broadcast_size,
        metavar="BYTES",
        help="largest broadcast message; larger ones are refused with 'invalid_message'",
    )
    parser.add_argument(
        "--broadcast-rate",
        type=positive_float,
        default=defaults.broadcast_rate,
        metavar="PER_SECOND",
        help="broadcasts per second each peer may send; more are refused with 'rate_limited'",
    )
    parser.add_argument(
        "--broadcast-burst",
        type=positive_float,
        default=defaults.broadcast_burst,
        metavar="MESSAGES",
        help="burst the broadcast rate allows (default: two seconds' worth)",
    )
    parser.add_argument(
        "--relay-type",
        action="append",
        type=relay_type,
        default=[],
        metavar="NAME",
        help=(
            "one more unicast message type relayed exactly like 'offer' (repeatable), "
            "e.g. bye or renegotiate"
        ),
    )
    parser.add_argument(
        "--auth-secret",
        type=nonempty,
        default=None,
        metavar="SECRET",
        help=(
            "require an HS256 JWT signed with SECRET on every upgrade (query 'token' or "
            "'Authorization: Bearer'); default: no auth. Prefer the environment variable, "
            "which keeps the secret out of the process list"
        ),
    )
    parser.add_argument(
        "--stun-uri",
        action="append",
        type=ice_uri,
        default=[],
        metavar="URI",
        help="STUN server announced in welcome's iceServers (repeatable), e.g. stun:stun.example",
    )
    parser.add_argument(
        "--turn-uri",
        action="append",
        type=ice_uri,
        default=[],
        metavar="URI",
        help=(
            "TURN server announced in welcome's iceServers with per-peer credentials "
            "(repeatable), e.g. turn:turn.example.org:3478?transport=udp; needs --turn-secret"
        ),
    )
    parser.add_argument(
        "--turn-secret",
        type=nonempty,
        default=None,
        metavar="SECRET",
        help="the TURN server's shared secret (coturn: use-auth-secret, static-auth-secret)",
    )
    parser.add_argument(
        "--turn-ttl",
        type=positive_int,
        default=defaults.turn_ttl,
        metavar="SECONDS",
        help="seconds a TURN credential stays valid",
    )
    parser.add_argument(
        "--allowed-origin",
        action="append",
        type=origin,
        default=[],
        metavar="ORIGIN",
        help=(
            "allow browsers from this Origin (repeatable, e.g. https://app.example); "
            "default: any. Requests without Origin (native clients) always pass"
        ),
    )
    parser.add_argument(
        "--resume-window",
        type=non_negative_float,
        default=defaults.resume_window,
        metavar="SECONDS",
        help=(
            "seconds a resumable session (?resumable=1) outlives a lost connection: it "
            "stays in its topic and what it is sent is kept until it resumes; 0 turns "
            "resumes off"
        ),
    )
    parser.add_argument(
        "--resume-secret",
        type=nonempty,
        default=None,
        metavar="SECRET",
        help=(
            "the key of resume tokens (default: a random one per start, so tokens do not "
            "survive a restart)"
        ),
    )
    parser.add_argument(
        "--admin-token",
        type=admin_token,
        default=None,
        metavar="TOKEN",
        help=(
            "turn on the admin API (/admin/v1: list topics and peers, kick, send server "
            "messages) for requests with 'Authorization: Bearer TOKEN'; default: off. "
            "Prefer the environment variable, which keeps it out of the process list"
        ),
    )
    parser.add_argument(
        "--admin-port",
        type=port_number,
        default=None,
        metavar="PORT",
        help=(
            "serve the admin API on this port only, not on the signaling port (which then "
            "answers /admin/v1 with 404); default: the signaling port"
        ),
    )
    parser.add_argument(
        "--admin-host",
        type=nonempty,
        default=None,
        metavar="HOST",
        help="address of --admin-port (127.0.0.1 keeps it off the network); default: --host",
    )
    parser.add_argument(
        "--webhook-url",
        action="append",
        type=webhook_url,
        default=[],
        metavar="URL",
        help=(
            "POST the topics' events (peer.joined, peer.left, topic.opened, topic.closed) "
            "to this URL in signed batches (repeatable); needs --webhook-secret; default: off"
        ),
    )
    parser.add_argument(
        "--webhook-secret",
        type=webhook_secret,
        default=None,
        metavar="SECRET",
        help=(
            "the key of the webhooks' HMAC-SHA256 signatures (Signaling-Signature), at "
            "least 16 characters. Prefer the environment variable"
        ),
    )
    parser.add_argument(
        "--webhook-queue",
        type=positive_int,
        default=defaults.webhook_queue,
        metavar="EVENTS",
        help=(
            "events a worker keeps for each webhook URL while it does not answer; more are "
            'dropped and counted (signaling_webhook_events_total{result="overflow"})'
        ),
    )
    parser.add_argument(
        "--redis-url",
        "--redis",
        type=redis_url,
        default=None,
        metavar="URL",
        help=(
            "cluster mode: share topics with every server on this Redis "
            "(redis://host:port/db, rediss:// for TLS, or the master of a Sentinel service: "
            "redis+sentinel://host:26379,host:26379/service/db); default: this machine alone"
        ),
    )
    parser.add_argument(
        "--redis-prefix",
        type=nonempty,
        default=defaults.redis_prefix,
        metavar="PREFIX",
        help="prefix of the cluster's Redis keys and channels (clusters can share a Redis)",
    )
    parser.add_argument(
        "--redis-flush-delay",
        type=flush_delay,
        default=defaults.redis_flush_delay,
        metavar="SECONDS",
        help=(
            "cluster mode: keep a node's writes to Redis this far apart, so that a steady "
            "stream of relays goes out in fewer, larger commands (a relay after a quiet "
            "spell goes at once); 0 to 0.1; 0: write at the end of every event loop iteration"
        ),
    )
    return parser


def parse_config(argv: Sequence[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.turn_uri and not args.turn_secret:
        parser.error("--turn-uri needs --turn-secret")
    if (args.admin_port is not None or args.admin_host is not None) and not args.admin_token:
        parser.error("--admin-port and --admin-host need --admin-token")
    if args.admin_host is not None and args.admin_port is None:
        parser.error("--admin-host needs --admin-port")
    if args.admin_port is not None and args.admin_port in (0, args.port):
        parser.error("--admin-port must be another port than --port, and not 0")
    if args.webhook_url and not args.webhook_secret:
        parser.error("--webhook-url needs --webhook-secret")
    if args.webhook_secret and not args.webhook_url:
        parser.error("--webhook-secret needs --webhook-url")
    # argparse checks choices on the command line only, not on defaults.
    if args.log_level not in LOG_LEVELS:
        parser.error(f"--log-level: {args.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    return Config(
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        max_message_size=args.max_message_size,
        max_queue_bytes=args.max_queue_bytes,
        handshake_timeout=args.handshake_timeout,
        max_peers_per_topic=args.max_peers_per_topic,
        max_connections=args.max_connections,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        auth_secret=args.auth_secret,
        stun_uris=tuple(args.stun_uri),
        turn_uris=tuple(args.turn_uri),
        turn_secret=args.turn_secret,
        turn_ttl=args.turn_ttl,
        allowed_origins=tuple(args.allowed_origin),
        redis_url=args.redis_url,
        redis_prefix=args.redis_prefix,
        redis_flush_delay=args.redis_flush_delay,
        resume_window=args.resume_window,
        resume_secret=args.resume_secret,
        admin_token=args.admin_token,
        admin_port=args.admin_port,
        admin_host=args.admin_host,
        broadcast=args.broadcast == "on",
        max_broadcast_size=args.max_broadcast_size,
        broadcast_rate=args.broadcast_rate,
        broadcast_burst=args.broadcast_burst,
        relay_types=tuple(dict.fromkeys(args.relay_type)),
        webhook_urls=tuple(args.webhook_url),
        webhook_secret=args.webhook_secret,
        webhook_queue=args.webhook_queue,
    )


def build_token_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signaling-sharded token",
        description="Print a token (HS256 JWT) for a server started with --auth-secret.",
    )
    parser.add_argument(
        "--secret",
        default=os.environ.get("SIGNALING_AUTH_SECRET"),
        help="the server's auth secret (default: $SIGNALING_AUTH_SECRET)",
    )
    parser.add_argument(
        "--topic",
        action="append",
        default=[],
        help="a topic the token may join (repeatable; default: any topic)",
    )
    parser.add_argument(
        "--ttl", type=positive_float, default=3600.0, help="seconds until the token expires"
    )
    parser.add_argument(
        "--metadata", help="JSON value that replaces the peer's ?metadata= (optional)"
    )
    return parser


def token_main(argv: Sequence[str]) -> None:
    parser = build_token_parser()
    args = parser.parse_args(argv)
    if not args.secret:
        parser.error("--secret or $SIGNALING_AUTH_SECRET is required")
    from signaling_sharded.server import auth

    metadata: object = auth.ABSENT
    if args.metadata is not None:
        try:
            metadata = json.loads(args.metadata)
        except ValueError:
            parser.error("--metadata must be JSON")
    print(auth.mint(args.secret, ttl=args.ttl, topics=args.topic or None, metadata=metadata))


def risky(config: Config) -> list[str]:
    """Settings that are valid but probably not what was meant."""
    warnings = []
    if config.rate_burst is not None and config.rate_limit is None:
        warnings.append("--rate-burst has no effect without --rate-limit")
    if config.turn_secret is not None and not config.turn_uris:
        warnings.append("--turn-secret has no effect without --turn-uri")
    if config.ping_timeout >= config.ping_interval * 10:
        warnings.append(
            "--ping-timeout is ten times --ping-interval or more: dead peers stay listed long"
        )
    return warnings


#: Descriptors a worker holds besides its connections: listeners, the
#: spare kept for refusals at the limit, links to the supervisor, to the
#: other workers and to Redis, webhook connections, handshakes under way.
FD_RESERVE = 64


def raise_descriptor_limit() -> tuple[int, int]:
    """Raises the soft limit on open descriptors to the hard one (the
    workers inherit it). Returns the limit before and the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # The kernel refuses more than fs.nr_open per process.
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def descriptor_notes(config: Config, before: int, limit: int) -> tuple[str | None, str | None]:
    """What to say of the descriptor limit: that it was raised (info), and
    that it caps ``--max-connections`` (a warning)."""
    raised = capped = None
    if limit > before:
        raised = f"raised the open file limit from {before} to {limit}, the hard limit"
    room = limit - FD_RESERVE - config.workers
    if limit != resource.RLIM_INFINITY and room < config.max_connections:
        capped = (
            f"the open file limit ({limit}) caps each worker at about {max(room, 0)} "
            f"connections, fewer than --max-connections {config.max_connections}; past it "
            "they get 503 (raise the hard limit: ulimit -Hn, systemd LimitNOFILE=, "
            "docker run --ulimit nofile=)"
        )
    return raised, capped


def main(argv: Sequence[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["token"]:
        token_main(arguments[1:])
        return
    if not sys.platform.startswith("linux"):
        sys.exit(f"signaling-sharded: error: the server runs on Linux only, not {sys.platform}")
    if not hasattr(os, "memfd_create"):
        # CPython has it when built against glibc 2.27 or later.
        sys.exit("signaling-sharded: error: this Python lacks os.memfd_create (glibc 2.27+)")
    config = parse_config(arguments)
    configure(config.log_level)
    for warning in risky(config):
        log(logging.WARNING, warning)
    raised, capped = descriptor_notes(config, *raise_descriptor_limit())
    if raised is not None:
        log(logging.INFO, raised)
    if capped is not None:
        log(logging.WARNING, capped)
    from signaling_sharded.server.supervisor import Supervisor

    sys.exit(Supervisor(config).run())
