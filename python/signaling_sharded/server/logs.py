"""JSON-lines logs on stdout: ``{"time", "level", "msg", ...fields}``.

The same shape as the original Go service's (log/slog's JSON handler), so
that the same log pipeline reads both.

Peers joining and leaving are logged at ``info``, so a storm of joins is a
storm of log lines: :func:`log` formats a line directly (no ``logging``
record, handler lock or formatter) and, inside a running event loop, writes
what one loop iteration logged with one ``write`` at the end of the
iteration. Outside a loop (start-up, the supervisor) each line is written at
once. Records of other libraries that reach the package's ``logging`` logger
take the same path.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import sys
import time
from typing import Any

logger = logging.getLogger("signaling_sharded")

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS["error"] = logging.ERROR

_threshold = logging.INFO
#: Bytes one write may carry and stay atomic on a pipe (POSIX PIPE_BUF is at
#: least 512; Linux's is 4096). Counted in characters: 1024 of them are at
#: most 4096 bytes of UTF-8.
ATOMIC_WRITE = 1024
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


class _Clock:
    """RFC 3339 UTC timestamps with milliseconds, formatted once a second."""

    second = -1
    prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.prefix}.{int((now - second) * 1000):03d}Z"


def timestamp() -> str:
    """Now, as RFC 3339 UTC with milliseconds (as the logs' ``time``)."""
    return _clock.now()


class _Sink:
    """Lines waiting for the end of the current loop iteration."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.fd = sys.stdout.fileno() if sys.stdout is not None else -1

    def write(self, line: str) -> None:
        if self.lines:  # a flush is due at the end of this iteration
            self.lines.append(line)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.emit(line)
            return
        loop.call_soon(self.flush)
        self.lines.append(line)

    def flush(self) -> None:
        # Workers share stdout: a write of at most PIPE_BUF bytes to a pipe is
        # atomic, so lines of different processes never interleave.
        chunk: list[str] = []
        size = 0
        for line in self.lines:
            if chunk and size + len(line) > ATOMIC_WRITE:
                self.emit("".join(chunk))
                chunk.clear()
                size = 0
            chunk.append(line)
            size += len(line)
        self.lines.clear()
        if chunk:
            self.emit("".join(chunk))

    def emit(self, text: str) -> None:
        data = text.encode()
        try:
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
        except OSError:
            pass  # stdout closed or full: logs must never take the server down


_clock = _Clock()
_sink = _Sink()
#: Write what is pending now (at exit, before a process ends its loop).
flush = _sink.flush
atexit.register(flush)


def log(level: int, msg: str, **fields: Any) -> None:
    """Log ``msg`` with ``fields`` as top-level keys of the JSON line."""
    if level < _threshold:
        return
    entry: dict[str, Any] = {
        "time": _clock.now(),
        "level": logging.getLevelName(level),
        "msg": msg,
    }
    entry.update(fields)
    _sink.write(_encode(entry) + "\n")


class _Handler(logging.Handler):
    """Routes other libraries' records through :func:`log`."""

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"logger": record.name}
        if record.exc_info:
            fields["exc"] = logging.Formatter().formatException(record.exc_info)
        log(record.levelno, record.getMessage(), **fields)


def configure(level: str) -> None:
    """Send logs at ``level`` and above to stdout as JSON lines."""
    global _threshold
    _threshold = LEVELS[level.lower()]
    _sink.fd = sys.stdout.fileno()
    logger.handlers[:] = [_Handler()]
    logger.setLevel(_threshold)
    logger.propagate = False
