"""The ``signaling-sharded`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from signaling_sharded import __version__
from signaling_sharded.config import Config
from signaling_sharded.logs import configure


def usable_cpus() -> int:
    """CPUs this process may run on (taskset, cpusets), not all the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text}")
    return value


ENV_PREFIX = "SIGNALING_"
LOG_LEVELS = ("debug", "info", "warning", "error")


def env_name(flag: str) -> str:
    """The environment variable of ``--some-flag``: ``SIGNALING_SOME_FLAG``."""
    return ENV_PREFIX + flag.removeprefix("--").upper().replace("-", "_")


class EnvArgumentParser(argparse.ArgumentParser):
    """Every ``--flag`` also takes its default from ``SIGNALING_FLAG``, so
    containers and service managers can configure the server without a
    command line. A repeatable flag takes a comma-separated list; the
    command line still wins."""

    def add_argument(self, *names: Any, **kwargs: Any) -> argparse.Action:
        flag = next((name for name in names if str(name).startswith("--")), None)
        if flag is not None and kwargs.get("action") not in ("version", "help"):
            variable = env_name(flag)
            value = os.environ.get(variable)
            if value is not None:
                repeated = kwargs.get("action") == "append"
                kwargs["default"] = [v for v in value.split(",") if v] if repeated else value
            kwargs["help"] = f"{kwargs.get('help', '')} [env {variable}]"
        return super().add_argument(*names, **kwargs)


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--host", default=defaults.host, help="address to listen on")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("PORT", defaults.port)),
        help="TCP port to listen on (default: $PORT, else 8081)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=usable_cpus(),
        help=(
            "worker processes; topics are sharded over them by a stable hash "
            "(default: the number of CPUs this process may use)"
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
        "--auth-secret",
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
        default=[],
        metavar="URI",
        help="STUN server announced in welcome's iceServers (repeatable), e.g. stun:stun.example",
    )
    parser.add_argument(
        "--turn-uri",
        action="append",
        default=[],
        metavar="URI",
        help=(
            "TURN server announced in welcome's iceServers with per-peer credentials "
            "(repeatable), e.g. turn:turn.example.org:3478?transport=udp; needs --turn-secret"
        ),
    )
    parser.add_argument(
        "--turn-secret",
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
        default=[],
        metavar="ORIGIN",
        help=(
            "allow browsers from this Origin (repeatable, e.g. https://app.example); "
            "default: any. Requests without Origin (native clients) always pass"
        ),
    )
    parser.add_argument(
        "--redis-url",
        "--redis",
        default=None,
        metavar="URL",
        help=(
            "cluster mode: share topics with every server on this Redis "
            "(redis://host:port/db, rediss:// for TLS); default: this machine alone"
        ),
    )
    parser.add_argument(
        "--redis-prefix",
        default=defaults.redis_prefix,
        metavar="PREFIX",
        help="prefix of the cluster's Redis keys and channels (clusters can share a Redis)",
    )
    return parser


def parse_config(argv: Sequence[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.turn_uri and not args.turn_secret:
        parser.error("--turn-uri needs --turn-secret")
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
        auth_secret=args.auth_secret or None,
        stun_uris=tuple(args.stun_uri),
        turn_uris=tuple(args.turn_uri),
        turn_secret=args.turn_secret or None,
        turn_ttl=args.turn_ttl,
        allowed_origins=tuple(args.allowed_origin),
        redis_url=args.redis_url or None,
        redis_prefix=args.redis_prefix,
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
    from signaling_sharded import auth

    metadata: object = auth.ABSENT
    if args.metadata is not None:
        try:
            metadata = json.loads(args.metadata)
        except ValueError:
            parser.error("--metadata must be JSON")
    print(auth.mint(args.secret, ttl=args.ttl, topics=args.topic or None, metadata=metadata))


def main(argv: Sequence[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["token"]:
        token_main(arguments[1:])
        return
    config = parse_config(arguments)
    configure(config.log_level)
    from signaling_sharded.supervisor import Supervisor

    sys.exit(Supervisor(config).run())
