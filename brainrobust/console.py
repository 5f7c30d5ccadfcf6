"""How log records read on a user's terminal (`conf/hydra/job_logging/brainrobust.yaml`)."""

from __future__ import annotations

import logging


class ConsoleFormatter(logging.Formatter):
    """Plain messages for progress; `warning:` / `error:` in front of what needs attention."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message
