"""How NexMDM logs: text for people, or JSON lines for log shippers (LOG_FORMAT=json); the level
from LOG_LEVEL; APScheduler's per-run INFO lines ("Running job ...", "executed successfully")
off unless LOG_LEVEL=DEBUG (scheduler/locking.py logs each run once, in our words)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from config.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def formatter_for(settings: Settings) -> logging.Formatter:
    """The formatter LOG_FORMAT names."""
    return JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(settings: Settings, level: str | None = None) -> None:
    """The root logger's handler, format and level (``level`` overrides LOG_LEVEL); idempotent."""
    root = logging.getLogger()
    if not any(getattr(h, "_nexmdm", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler._nexmdm = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for handler in root.handlers:
        if getattr(handler, "_nexmdm", False):
            handler.setFormatter(formatter_for(settings))
    root.setLevel(level or settings.log_level)
    quiet = logging.getLevelName(settings.log_level) > logging.DEBUG
    logging.getLogger("apscheduler").setLevel(logging.WARNING if quiet else logging.DEBUG)
