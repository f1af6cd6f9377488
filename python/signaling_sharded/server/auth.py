"""Opt-in auth (PROTOCOL.md section 6): HS256 JSON Web Tokens.

With a secret configured, every upgrade needs a token, from the ``token``
query parameter (browsers cannot set headers on a WebSocket) or an
``Authorization: Bearer`` header. A token must be signed with the secret
(HS256 only: ``alg: none`` and every other algorithm are refused) and carry
``exp``. Optional claims: ``topic``, the only topic it may join (a string)
or the topics it may join (a list of strings); ``metadata``, any JSON value,
which replaces the ``?metadata=`` of the request and which the peer may not
change (``update-metadata``) unless ``"canUpdateMetadata": true``.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from signaling_sharded._native import MAX_METADATA_BYTES

ALGORITHM = "HS256"
#: Shortest secret RFC 7518 section 3.2 recommends for HS256, in bytes.
MIN_SECRET_BYTES = 32

# PyJWT warns on every call with a short key; the server says it once at
# start (weak_secret) instead.
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)


def weak_secret(secret: str) -> bool:
    return len(secret.encode()) < MIN_SECRET_BYTES


#: Stands for a claim that is not there.
ABSENT = object()


@dataclass(frozen=True)
class Grant:
    """What a valid token allows: its metadata (JSON text), if it has any,
    and whether the peer may change it (``"canUpdateMetadata": true``)."""

    metadata: str | None
    can_update_metadata: bool = True


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def authorize(secret: str, token: str | None, topic: str) -> Grant | None:
    """The grant of ``token`` for joining ``topic``, or None if refused."""
    if not token:
        return None
    try:
        claims: dict[str, Any] = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["exp"]}
        )
    except jwt.PyJWTError:
        return None
    allowed = claims.get("topic", ABSENT)
    if allowed is not ABSENT and not _allows(allowed, topic):
        return None
    metadata = claims.get("metadata", ABSENT)
    if metadata is ABSENT:
        return Grant(None)
    text = json.dumps(metadata, ensure_ascii=False, separators=(",", ":"))
    if len(text.encode()) > MAX_METADATA_BYTES:
        return None
    return Grant(text, claims.get("canUpdateMetadata") is True)


def _allows(allowed: object, topic: str) -> bool:
    if isinstance(allowed, str):
        return allowed == topic
    if isinstance(allowed, list) and all(isinstance(name, str) for name in allowed):
        return topic in allowed
    return False


def mint(
    secret: str,
    *,
    ttl: float,
    topics: list[str] | None = None,
    metadata: object = ABSENT,
    can_update_metadata: bool = False,
    now: float | None = None,
) -> str:
    """A token valid for ``ttl`` seconds, for ``topics`` (any when None);
    its ``metadata`` may be changed by the peer if ``can_update_metadata``."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"iat": issued, "exp": issued + int(ttl)}
    if topics:
        claims["topic"] = topics[0] if len(topics) == 1 else topics
    if metadata is not ABSENT:
        claims["metadata"] = metadata
        if can_update_metadata:
            claims["canUpdateMetadata"] = True
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
