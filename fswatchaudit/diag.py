"""The tool's own diagnostics, through structlog: readable on a terminal, JSON lines
otherwise (a service's journal, a pipe), always on stderr so stdout stays for events."""
from __future__ import annotations

import logging
import sys

import structlog


def configure(json: bool | None = None, level: int = logging.INFO) -> None:
    """Set up structlog once per process; ``json=None`` decides by whether stderr is a
    terminal."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer = (structlog.processors.JSONRenderer() if json
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name).bind(component=name)
