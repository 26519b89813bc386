"""The one logging set-up for command-line entry points."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | int | None = None) -> None:
    """Plain ``time level name: message`` lines on stderr; ``ICEAGGR_LOG_LEVEL`` overrides."""
    level = level or os.environ.get("ICEAGGR_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
