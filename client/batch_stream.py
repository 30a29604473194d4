"""``BatchStream``: what every feed (``Feed``, ``FanInFeed``) builds on its own ``next_batch``,
``seek`` and ``close``: generators for Keras and PyTorch, ``keras_input``, tf.data, the
``state_dict`` of a position, and ``with``."""

from __future__ import annotations

from collections import deque

PEEKED_BATCHES = 2


def check_state(state: dict, stream) -> tuple[int, int]:
    """The position in ``state`` (a ``state_dict()``), once it is shown to be of ``stream``'s stream."""
    if not isinstance(state, dict) or not isinstance(state.get("position"), (list, tuple)):
        raise ValueError(f"not a ringfeed state_dict: {state!r}")
    spec = stream.spec
    ours = {"steps_per_epoch": stream.steps_per_epoch, "batch_size": spec.batch_size, "samples": spec.samples}
    theirs = {key: state.get(key) for key in ours}
    if theirs != ours:
        raise ValueError(f"the state_dict is of another stream: {theirs}, this one has {ours}")
    position = tuple(state["position"])
    if (len(position) != 2 or not all(type(v) is int for v in position) or position[0] < 0
            or not 0 <= position[1] < spec.steps_per_epoch):
        raise ValueError(f"state_dict position {state['position']!r}: expected [epoch >= 0, index in "
                         f"0..{spec.steps_per_epoch - 1}]")
    return position


class BatchStream:
    """What every feed builds on its own ``next_batch``, ``seek`` and ``close``, and its ``spec``,
    ``steps_per_epoch``, ``position`` and ``pin_memory``: a generator, tf.data, ``with``."""

    def generator(self):
        """An infinite generator of batches, ``(x, y)`` or ``(x, y, w)`` as ``spec.structure``
        says, for ``model.fit``. Its first ``PEEKED_BATCHES`` are copies: Keras keeps the first
        batches of a generator even after the fit ends (Keras 3.15), and a lent batch would hold
        its ring slot for as long."""
        for _ in range(PEEKED_BATCHES):
            yield self.next_batch(copy=True)
        while True:
            yield self.next_batch()

    def torch_generator(self):
        """``generator()`` with each array of a batch as a CPU torch tensor over the same memory
        (``torch.from_numpy``, no copy), in the same structure. Keras on the torch backend
        copies every numpy input (``np.array``) before it sends it to the device; a tensor goes
        to the device as it is, and from a ``pin_memory`` feed's ring at page-locked speed.

        A slot goes back to the ring when its tensors die, but an asynchronous copy from
        page-locked memory (``x.to("cuda", non_blocking=True)``) may still be reading it then.
        So a pinned feed's generator keeps each batch until a CUDA event, recorded on the
        current stream when the caller asks for the next batch, has completed: copies queued
        on that stream are safe. Keras copies with blocking copies."""
        import torch

        batches, structure = self.generator(), self.spec.structure
        if not self.pin_memory:
            while True:  # no local may hold the last batch's arrays while this generator waits
                yield structure.map(torch.from_numpy, next(batches))
        copying: deque = deque()  # (batch, event) that a queued copy may still be reading
        while True:
            batch = structure.map(torch.from_numpy, next(batches))
            yield batch
            event = torch.cuda.Event()
            event.record()  # after whatever the caller queued on its stream for this batch
            copying.append((batch, event))
            del batch
            while copying and copying[0][1].query():
                copying.popleft()

    def keras_input(self):
        """A ``keras.utils.PyDataset`` whose length is the epoch: ``model.fit(feed.keras_input(),
        epochs=E)`` needs no ``steps_per_epoch``, and Keras' epoch e is ringfeed's epoch e
        (see ``client/keras.py``)."""
        from .keras import KerasInput

        return KerasInput(self)

    def state_dict(self) -> dict:
        """Where this stream is, as torchdata's ``StatefulDataLoader`` has it: the position of the
        next batch ``next_batch`` will return, with what identifies the stream. A loop that
        trains each batch as it takes it has trained through exactly this."""
        spec = self.spec
        return {"position": list(self.position), "steps_per_epoch": self.steps_per_epoch,
                "batch_size": spec.batch_size, "samples": spec.samples}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict()`` of the same stream: the next batch is the one it names."""
        self.seek(check_state(state, self))

    def as_tf_dataset(self, prefetch: int = 2):
        """A prefetching ``tf.data.Dataset`` whose ``element_spec`` is known without peeking."""
        from .tf_adapter import as_tf_dataset

        return as_tf_dataset(self, prefetch)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
