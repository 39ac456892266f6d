"""Structured, quiet-by-default logging shared by every component."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({})))


class _KeyValueFormatter(logging.Formatter):
    """``level logger message key=value ...``; JSON lines when LORAPLANE_LOG_FORMAT=json."""

    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        extra: dict[str, Any] = {k: v for k, v in vars(record).items() if k not in _RESERVED}
        if self.as_json:
            payload = {"level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
            payload.update(extra)
            return json.dumps(payload, default=str)
        pairs = " ".join(f"{k}={v}" for k, v in extra.items())
        return f"{record.levelname.lower():7} {record.name}: {record.getMessage()}" + (
            f" {pairs}" if pairs else ""
        )


def configure_logging(verbosity: int = 0) -> None:
    """Warnings only by default; ``-v`` info, ``-vv`` debug. Format from LORAPLANE_LOG_FORMAT."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter(os.environ.get("LORAPLANE_LOG_FORMAT", "text") == "json"))
    root = logging.getLogger("loraplane")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
