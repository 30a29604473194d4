"""``FanInFeed``: one stream from several servers, each serving a shard of every epoch.

With n endpoints, server i serves batch indices i, i+n, i+2n, ... of each
epoch (``Feed(shard=(i, n))``); the fan-in takes batch index j from server
j mod n, so the stream is the one a single server would give for the same
seed and data. A server that stops answering is reported (a warning, and
``down`` / ``stats["missed"]``) and its batches are skipped while the others
go on; every ``REJOIN_S`` the fan-in tries it again, at the batch it has
reached, and it rejoins when it answers.
"""

from __future__ import annotations

import logging
import time

from .batch_stream import BatchStream
from .errors import RingfeedError
from .feed import DEFAULT_TIMEOUT_S, Feed

log = logging.getLogger("ringfeed.fanin")

REJOIN_S = 2.0
REJOIN_TIMEOUT_S = 0.5


class FanInFeed(BatchStream):
    """One stream from the servers at ``endpoints`` (a list, in shard order); the other options
    are ``Feed``'s, given to the feed of each server, but ``job`` and ``shard``."""

    def __init__(self, endpoints: list[str], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 start: tuple[int, int] = (0, 0), **options):
        if isinstance(endpoints, str) or not endpoints or not all(isinstance(e, str) for e in endpoints):
            raise ValueError(f"endpoints must be a non-empty list of strings, got {endpoints!r} "
                             "(ringfeed.open_feed takes a comma-separated list or a pattern)")
        if "job" in options or "shard" in options:
            raise ValueError("a fan-in feed assigns shards itself; give job/shard to single feeds")
        self.endpoints, self.timeout_s, self._options = list(endpoints), timeout_s, options
        self.pin_memory = options.get("pin_memory", False)
        n = len(endpoints)
        self._feeds: list[Feed | None] = []
        for i, endpoint in enumerate(endpoints):
            self._feeds.append(Feed(endpoint, timeout_s=timeout_s, shard=(i, n),
                                    start=self._shard_start(start, i, n, None), **options))
        first = self._feeds[0]
        self.spec = first.spec
        self.steps_per_epoch = self.spec.steps_per_epoch
        if n > self.steps_per_epoch:
            raise ValueError(f"{n} servers but only {self.steps_per_epoch} batches per epoch")
        for feed in self._feeds[1:]:
            if feed.spec != self.spec:
                raise RingfeedError(f"servers disagree: {feed.endpoint} serves {feed.spec}, "
                                    f"{first.endpoint} serves {self.spec}")
        self._next = start[0] * self.steps_per_epoch + start[1]
        self._retry_at = [0.0] * n
        self.stats = {"batches": 0, "wait_s": 0.0, "missed": 0}

    def _shard_start(self, start: tuple[int, int], i: int, n: int, steps: int | None) -> tuple[int, int]:
        """The first batch of shard i at or after global position ``start``."""
        epoch, index = start
        first = index + (i - index) % n
        if steps is not None and first >= steps:
            return epoch + 1, i
        return epoch, first

    @property
    def position(self) -> tuple[int, int]:
        return divmod(self._next, self.steps_per_epoch)

    @property
    def progress(self) -> tuple[int, int]:
        return self.position

    @property
    def down(self) -> list[str]:
        """Endpoints currently skipped because they stopped answering."""
        return [e for e, f in zip(self.endpoints, self._feeds) if f is None]

    def next_batch(self, copy: bool = False):
        while True:
            epoch, index = self.position
            shard = index % len(self._feeds)
            feed = self._feeds[shard] or self._rejoin(shard)
            self._next += 1
            if feed is None:
                self.stats["missed"] += 1
                continue
            try:
                batch = feed.next_batch(copy)
            except RingfeedError as exc:
                if not isinstance(exc, TimeoutError):
                    raise
                log.warning("server %s dropped out (%s); going on with the others", feed.endpoint, exc)
                feed.close()
                self._feeds[shard] = None
                self._retry_at[shard] = time.monotonic() + REJOIN_S
                self.stats["missed"] += 1
                continue
            self.stats["batches"] += 1
            self.stats["wait_s"] = sum(f.stats["wait_s"] for f in self._feeds if f is not None)
            return batch

    def seek(self, position: tuple[int, int]) -> None:
        """Make ``position`` the next batch: each server's feed moves to its shard's first batch
        at or after it (a server that is down rejoins there)."""
        n = len(self._feeds)
        for shard, feed in enumerate(self._feeds):
            if feed is not None:
                feed.seek(self._shard_start(position, shard, n, self.steps_per_epoch))
        self._next = position[0] * self.steps_per_epoch + position[1]

    def _rejoin(self, shard: int) -> Feed | None:
        if time.monotonic() < self._retry_at[shard]:
            return None
        n = len(self._feeds)
        start = self._shard_start(self.position, shard, n, self.steps_per_epoch)
        try:
            feed = Feed(self.endpoints[shard], timeout_s=max(REJOIN_TIMEOUT_S, 0.1), shard=(shard, n),
                        start=start, **self._options)
        except RingfeedError:
            self._retry_at[shard] = time.monotonic() + REJOIN_S
            return None
        feed.timeout_s = self.timeout_s
        log.warning("server %s is back; it rejoins at batch %s", self.endpoints[shard], start)
        self._feeds[shard] = feed
        return feed

    def close(self) -> None:
        for feed in self._feeds:
            if feed is not None:
                feed.close()
