"""The host's log: one format for every package logger (flux2_core.*, flux2_host.*, flux2.*), written to stderr
and, for the canvas's Logs panel, kept in a ring buffer the `/internal/logs*` routes read and stream.

Entries have ComfyUI's shape: `{"t": ISO time, "m": the formatted line with its newline}`.
"""

from __future__ import annotations

import collections
import datetime
import logging
import threading
from typing import Callable

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
KEPT_ENTRIES = 1000  # ComfyUI keeps a few hundred; the Logs panel shows the recent ones
_OURS = "flux2_handler"  # the attribute that marks the handlers configure_logging installed

LogEntry = dict[str, str]


class LogBuffer(logging.Handler):
    """The last `capacity` log lines, and listeners told about each new one (from the logging thread)."""

    def __init__(self, capacity: int = KEPT_ENTRIES) -> None:
        super().__init__()
        self.entries: collections.deque[LogEntry] = collections.deque(maxlen=capacity)
        self.listeners: list[Callable[[LogEntry], None]] = []
        self._entries_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = {"t": datetime.datetime.fromtimestamp(record.created).isoformat(), "m": self.format(record) + "\n"}
        except Exception:
            self.handleError(record)
            return
        with self._entries_lock:
            self.entries.append(entry)
        for listener in list(self.listeners):
            listener(entry)

    def snapshot(self) -> list[LogEntry]:
        with self._entries_lock:
            return list(self.entries)


def configure_logging(level: int = logging.INFO) -> LogBuffer:
    """Send every record to stderr in LOG_FORMAT and into a LogBuffer (returned). Handlers an earlier call
    installed are replaced, so a second command in one process (tests) does not print twice."""
    formatter = logging.Formatter(LOG_FORMAT, DATE_FORMAT)
    buffer = LogBuffer()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(handler)
    for handler in (logging.StreamHandler(), buffer):
        handler.setFormatter(formatter)
        setattr(handler, _OURS, True)
        root.addHandler(handler)
    root.setLevel(level)
    return buffer

