"""Keras integration: an epoch-aligned input, exact resume, and the input-wait share of each epoch.

``KerasInput`` (``feed.keras_input()``) is a ``keras.utils.PyDataset`` whose length is the epoch.
Keras asks a PyDataset for each epoch's batches through a fresh generator that yields exactly
``len`` of them, and starts that generator only when it trains the epoch, so the k-th batch
asked for in Keras' epoch e is the k-th the stream hands out in it: ringfeed's batch (e, k).
The index Keras passes is ignored: the stream is already shuffled every epoch, and with
``model.fit``'s default ``shuffle=True`` Keras would only permute the names of the batches.
Before the first epoch, Keras (TensorFlow backend) looks at the first two batches for their
specs; those come from the WELCOME's shapes as zeros, so looking consumes nothing.

Keras cannot start an epoch in its middle. A stream resumed at (e, i > 0) serves only the
``len - i`` batches left in Keras' epoch e, which Keras sees as its input ending early; the
warning it gives for that is silenced for that epoch only.

``StreamCheckpoint`` records the position the model has trained through from Keras' own epoch
and step counters (not from what the feed has handed out, which is ahead by Keras' prefetch)
and saves it with the model, in one checkpoint folder a ``latest.json`` points at.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import keras
import numpy as np

RAN_OUT = r"Your input ran out of data"  # Keras' warning for an epoch whose input ends early
LATEST = "latest.json"
ARRAY_COPY = r"__array__ implementation doesn't accept a copy keyword"


class InputStallWarning(UserWarning):
    """The trainer waited for input for more than the set share of an epoch."""


class KerasInput(keras.utils.PyDataset):
    """A feed as a PyDataset: Keras' epoch e, step k trains ringfeed's batch (e, k)."""

    def __init__(self, stream):
        super().__init__(workers=1, use_multiprocessing=False)  # one reader keeps the stream's order
        self.stream = stream
        self.steps = stream.steps_per_epoch
        self._begun = False
        self._short: int | None = None  # batches left in a resumed epoch, until its generator starts
        self._quiet: warnings.catch_warnings | None = None

    def __len__(self) -> int:
        return self.steps

    @property
    def num_batches(self) -> int:  # read by Keras at the start of a fit and of each epoch's generator
        return self._short if self._short is not None else self.steps

    def __getitem__(self, index: int):
        if not self._begun:
            return self._placeholder()
        self._short = None
        return self.stream.next_batch()

    def on_epoch_begin(self) -> None:
        self._begun = True
        done = self.stream.progress[1]
        if done:
            self._short = self.steps - done
            self._quiet = warnings.catch_warnings()
            self._quiet.__enter__()
            warnings.filterwarnings("ignore", message=RAN_OUT)

    def on_epoch_end(self) -> None:
        if self._quiet is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None

    def _placeholder(self):
        spec = self.stream.spec
        return spec.structure.assemble({field.name: np.zeros((spec.batch_size, *field.shape), field.dtype)
                                        for field in spec.fields})


class StreamCheckpoint(keras.callbacks.Callback):
    """Saves the model and the position it has trained through, together, every ``save_freq``
    steps or at each epoch's end ("epoch"). ``position`` and ``initial_epoch`` say where to
    resume (``(0, 0)`` and 0 before any save); ``load_model()`` is the saved model or ``None``:

        ckpt = StreamCheckpoint("run")
        model = ckpt.load_model() or build_model()
        with Feed(start=ckpt.position) as feed:
            model.fit(feed.keras_input(), epochs=5, initial_epoch=ckpt.initial_epoch, callbacks=[ckpt])
    """

    def __init__(self, directory, save_freq="epoch", keep: int = 2):
        super().__init__()
        if save_freq != "epoch" and not (type(save_freq) is int and save_freq >= 1):
            raise ValueError(f"save_freq must be 'epoch' or an integer >= 1 (steps), got {save_freq!r}")
        if type(keep) is not int or keep < 1:
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
        self.directory, self.save_freq, self.keep = Path(directory), save_freq, keep
        self._latest = self._read_latest()
        self._epoch = self._first = self._since_save = 0
        self._trained: tuple[int, int] | None = None

    @property
    def position(self) -> tuple[int, int]:
        return tuple(self._latest["position"]) if self._latest else (0, 0)

    @property
    def initial_epoch(self) -> int:
        return self.position[0]

    def load_model(self, **options):
        if not self._latest:
            return None
        return keras.saving.load_model(self.directory / self._latest["checkpoint"] / "model.keras", **options)

    def on_train_begin(self, logs=None) -> None:
        self._trained = None

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if self._trained is None and epoch != self.initial_epoch:
            raise ValueError(f"fit(initial_epoch={epoch}) but the stream resumes in epoch {self.initial_epoch} "
                             f"at {self.position}: pass initial_epoch=checkpoint.initial_epoch")
        self._first = self.position[1] if self._trained is None else 0
        self._epoch = epoch
        self._trained = (epoch, self._first)

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        steps = self.params["steps"]
        index = self._first + batch + 1
        self._trained = (self._epoch + 1, 0) if index >= steps else (self._epoch, index)
        self._since_save += 1
        if self.save_freq != "epoch" and self._since_save >= self.save_freq:
            self.save()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        self._trained = (epoch + 1, 0)
        if self.save_freq == "epoch":
            self.save()

    def save(self) -> None:
        """Write the model and the position it has trained through, then point ``latest.json`` at them."""
        epoch, index = self._trained
        name = f"epoch{epoch}-batch{index}"
        folder = self.directory / name
        folder.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # TensorFlow's variables under numpy 2, on every save
            warnings.filterwarnings("ignore", message=ARRAY_COPY, category=DeprecationWarning)
            self.model.save(folder / "model.keras")
        record = {"checkpoint": name, "position": [epoch, index], "saved_at": time.time()}
        tmp = self.directory / f".{LATEST}.{os.getpid()}"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.directory / LATEST)  # the switch to the new pair is one rename
        self._latest, self._since_save = record, 0
        self._prune(keep_name=name)

    def _read_latest(self) -> dict | None:
        path = self.directory / LATEST
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
            position = record["position"]
            if not (isinstance(record["checkpoint"], str) and len(position) == 2
                    and all(type(v) is int and v >= 0 for v in position)
                    and (self.directory / record["checkpoint"] / "model.keras").is_file()):
                raise ValueError
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a ringfeed checkpoint record (expected checkpoint, position "
                             f"[epoch, index] and its model.keras beside it)") from exc
        return record

    def _prune(self, keep_name: str) -> None:
        folders = sorted((p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith("epoch")),
                         key=lambda p: p.stat().st_mtime)
        for old in [p for p in folders if p.name != keep_name][:max(0, len(folders) - self.keep)]:
            shutil.rmtree(old)


class InputStallMonitor(keras.callbacks.Callback):
    """Adds ``input_wait_share`` (the share of each epoch's wall time the feed spent waiting
    for batches) to the epoch's logs, so it reaches the progress bar, ``History`` and any
    logger listed after this callback; warns once when a share exceeds ``warn_share``."""

    def __init__(self, stream, warn_share: float = 0.2):
        super().__init__()
        if not 0 < warn_share <= 1:
            raise ValueError(f"warn_share must be in (0, 1], got {warn_share!r}")
        self.stream, self.warn_share = stream, warn_share
        self._warned = False
        self._began_at = self._waited_before = 0.0

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._began_at, self._waited_before = time.perf_counter(), self.stream.stats["wait_s"]

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        wall = time.perf_counter() - self._began_at
        waited = self.stream.stats["wait_s"] - self._waited_before
        share = waited / wall if wall > 0 else 0.0
        if logs is not None:
            logs["input_wait_share"] = round(share, 4)
        if share > self.warn_share and not self._warned:
            self._warned = True
            warnings.warn(
                f"the trainer waited for input {share:.0%} of epoch {epoch} ({waited:.2f} s of {wall:.2f} s): "
                "the loader is the bottleneck. If its workers are busy all the time, add workers "
                "(workers = \"auto\" finds how many); if they are not, a slow op is the cost. "
                "`ringfeed status --watch` shows each worker's busy share and batch time.",
                InputStallWarning, stacklevel=2)
