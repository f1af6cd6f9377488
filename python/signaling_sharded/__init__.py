"""signaling-sharded: a WebRTC signaling server on a Rust core.

Run it with ``signaling-sharded`` (see ``--help``); the wire protocol is
described in docs/protocol.md.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("signaling-sharded")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
