"""Log lines a peer can cause, at most one per interval, counting what was held back."""

from __future__ import annotations

import logging
import time


class LogLimiter:
    def __init__(self, logger: logging.Logger, every_s: float):
        self.logger, self.every_s = logger, every_s
        self._last = -float("inf")
        self._held = 0

    def log(self, level: int, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._held += 1
            return
        if self._held:
            message += f" (and {self._held} more like it since the last such message)"
        self.logger.log(level, message, *args)
        self._last, self._held = now, 0
