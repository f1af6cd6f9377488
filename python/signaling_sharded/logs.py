"""JSON-lines logs on stdout: ``{"time", "level", "msg", ...fields}``.

The same shape as the original Go service's (log/slog's JSON handler), so
that the same log pipeline reads both.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

logger = logging.getLogger("signaling_sharded")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"), default=str)


def configure(level: str) -> None:
    """Send this package's logs to stdout as JSON lines at ``level``."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def log(level: int, msg: str, **fields: Any) -> None:
    """Log ``msg`` with ``fields`` as top-level keys of the JSON line."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"fields": fields})
