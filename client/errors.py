"""The client's exceptions: every one is a ``RingfeedError``."""

from __future__ import annotations


class RingfeedError(RuntimeError):
    """Raised by the client for server-side errors and protocol failures."""


class ServerGoneError(RingfeedError, TimeoutError):
    """The server did not answer within ``timeout_s``."""


class RemoteWorkerError(RingfeedError):
    """An exception raised in a worker, with the worker's traceback."""

    def __init__(self, details: dict):
        self.details = details
        self.kind = details.get("kind")
        self.traceback = details.get("traceback", "")
        self.epoch, self.index = details.get("epoch"), details.get("index")
        self.sample = details.get("sample")
        where = f" in batch (epoch {self.epoch}, index {self.index})" if self.epoch is not None else ""
        if self.sample is not None:
            where += f", sample {self.sample}"
        super().__init__(f"{self.kind}{where}: {details.get('message')}"
                         + (f"\n--- worker traceback ---\n{self.traceback}" if self.traceback else ""))


class PinMemoryError(RingfeedError):
    """``pin_memory=True`` cannot be honoured here."""
