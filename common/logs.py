"""structlog set-up shared by the services: key-value events on stderr, filtered by level."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info", **context: object) -> None:
    """Log ``key=value`` events with a timestamp and level; ``context`` (e.g. service, replica)
    is bound into every event of this process."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"]),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(**context)
