"""Structured logs: one JSON object per line, with the request id and key id when a
log call passes them (`extra={"request_id": ..., "key_id": ...}`)."""

from __future__ import annotations

import logging
import time

import msgspec

_EXTRA = ("request_id", "key_id", "replica", "reason", "status")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for name in _EXTRA:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(out).decode()
