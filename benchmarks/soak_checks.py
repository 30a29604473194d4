"""soak.py's checks: every delivered batch against the one recomputed in this process, and each
epoch's sample ids counted (duplicates, losses, ids outside the epoch).
"""

from __future__ import annotations

import os
import secrets
import time

import numpy as np

MAX_EXAMPLES = 20  # mismatches / gaps recorded in detail
EPOCH_COLUMNS = ["epoch", "complete", "batches", "ids_delivered", "duplicates", "losses", "unexpected",
                 "label_mismatches", "x_checked", "x_mismatches", "seconds"]


class Verifier:
    """Recomputes batches in this process and keeps the per-epoch id accounting."""

    def __init__(self, config, features: np.ndarray, labels: np.ndarray):
        from ringfeed.server import shm
        from ringfeed.server.batches import BatchMaker
        from ringfeed.server.sources import publish

        self.segment = shm.segment_name(os.getpid(), secrets.token_hex(4), "data")
        self.maker = BatchMaker(config, publish({"features": features, "labels": labels}, self.segment))
        self.labels = labels
        self.n = len(labels)
        self.steps = self.maker.sampler.steps_per_epoch
        self.expected = self.maker.empty_batch()
        self.x = self.expected["features"]
        self.counts = np.zeros(self.n, np.int32)
        self.epoch_start = time.monotonic()
        self.epoch_batches = 0
        self.epoch_label_mismatches = 0
        self.epoch_x_mismatches = 0
        self.epoch_checked = 0
        self.epochs: list[list] = []  # rows of EPOCH_COLUMNS
        self.mismatches: list[dict] = []
        self.totals = {"batches": 0, "x_checked": 0, "x_mismatches": 0, "label_mismatches": 0,
                       "bad_ids": 0, "duplicates": 0, "losses": 0, "unexpected": 0}

    def close(self) -> None:
        try:
            os.unlink(f"/dev/shm/{self.segment}")
        except FileNotFoundError:
            pass

    def _record(self, kind: str, seq: int, epoch: int, index: int, **detail) -> None:
        if len(self.mismatches) < MAX_EXAMPLES:
            self.mismatches.append({"kind": kind, "seq": seq, "epoch": epoch, "index": index, **detail})

    def batch(self, seq: int, x: np.ndarray, y: np.ndarray, check_x: bool) -> None:
        epoch, index = divmod(seq, self.steps)
        self.totals["batches"] += 1
        self.epoch_batches += 1
        ids = np.asarray(y).reshape(len(y), -1)[:, 0].astype(np.int64)
        bad = (ids < 0) | (ids >= self.n)
        if bad.any():
            self.totals["bad_ids"] += int(bad.sum())
            self._record("id out of range", seq, epoch, index, ids=ids[bad][:8].tolist())
            ids = ids[~bad]
        np.add.at(self.counts, ids, 1)
        expected_y = self.labels[self.maker.sampler.indices(epoch, index)]
        if y.shape != expected_y.shape or not np.array_equal(y, expected_y):
            self.totals["label_mismatches"] += 1
            self.epoch_label_mismatches += 1
            self._record("labels", seq, epoch, index, got=np.asarray(y).ravel()[:8].tolist(),
                         expected=expected_y.ravel()[:8].tolist())
        if check_x:
            self.maker.make(epoch, index, self.expected)
            self.totals["x_checked"] += 1
            self.epoch_checked += 1
            same = (x.shape == self.x.shape and x.dtype == self.x.dtype
                    and np.array_equal(np.ascontiguousarray(x).reshape(-1).view(np.uint8),
                                       self.x.reshape(-1).view(np.uint8)))
            if not same:
                self.totals["x_mismatches"] += 1
                self.epoch_x_mismatches += 1
                detail = {"shape": list(x.shape), "dtype": str(x.dtype)}
                if x.shape == self.x.shape:
                    diff = np.abs(x.astype(np.float64) - self.x.astype(np.float64))
                    detail.update(max_abs_diff=float(np.nanmax(diff)),
                                  samples_differing=int((diff.reshape(len(x), -1).max(axis=1) > 0).sum()))
                self._record("x", seq, epoch, index, **detail)
        if index == self.steps - 1:
            self.end_epoch(epoch, complete=True)

    def end_epoch(self, epoch: int, complete: bool) -> None:
        if self.epoch_batches == 0:
            return
        sampler = self.maker.sampler
        expected = np.zeros(self.n, bool)
        last = self.steps if complete else self.epoch_batches
        for index in range(last):
            expected[np.asarray(self.labels[sampler.indices(epoch, index)]).reshape(-1)] = True
        duplicates = int(np.maximum(self.counts - 1, 0).sum())
        losses = int((expected & (self.counts == 0)).sum())
        unexpected = int(((~expected) & (self.counts > 0)).sum())
        for key, value in (("duplicates", duplicates), ("losses", losses), ("unexpected", unexpected)):
            self.totals[key] += value
        self.epochs.append([epoch, complete, self.epoch_batches, int(self.counts.sum()), duplicates, losses,
                            unexpected, self.epoch_label_mismatches, self.epoch_checked, self.epoch_x_mismatches,
                            round(time.monotonic() - self.epoch_start, 3)])
        self.counts[:] = 0
        self.epoch_batches = self.epoch_label_mismatches = self.epoch_x_mismatches = self.epoch_checked = 0
        self.epoch_start = time.monotonic()

    @property
    def complete_epochs(self) -> int:
        return sum(1 for row in self.epochs if row[1])

    def failures(self) -> int:
        t = self.totals
        return (t["duplicates"] + t["losses"] + t["unexpected"] + t["bad_ids"] + t["label_mismatches"]
                + t["x_mismatches"])
