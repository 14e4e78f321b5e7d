"""Logging set-up for the CLI: plain lines for a terminal, or one JSON object per line for a collector.

A record may carry structured `fields` (`logger.info(..., extra={"fields": {...}})`): the JSON format puts
them beside the message as they are, so a collector can filter on status or duration without parsing text.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
TRACE = 5  # uvicorn's level below DEBUG (protocol events)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry |= fields
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _iso_utc(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a record comes, not to the stream it was when the handler
    was made (`main()` run in-process, as tests do, must not leave a handler on a closed capture)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    """Our one handler on the root logger (replacing an earlier one of ours, leaving others alone);
    uvicorn's loggers propagate to it (run it with `log_config=None`)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        if isinstance(old, StderrHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    root.setLevel(TRACE if level == "trace" else level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
