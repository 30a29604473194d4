"""Trainers run as their own processes by tests/test_keras_input.py, recording what they train.

    python tests/trainers.py keras ENDPOINT CKPT_DIR OUT.npz EPOCHS CRASH_AT_STEP
    python tests/trainers.py torch ENDPOINT STATE.json OUT.npz STEPS CRASH_AT_STEP

``keras`` trains through ``feed.keras_input()`` with a ``StreamCheckpoint`` saving every step,
resuming from ``CKPT_DIR`` when it holds one; ``torch`` runs a plain loop over
``feed.torch_generator()`` and keeps its ``state_dict()`` in ``STATE.json``. Both exit at once
(no clean-up, as a killed trainer would) after the global step ``CRASH_AT_STEP`` (-1: never),
having written the features of every batch they trained, in order, to ``OUT.npz``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ringfeed import Feed  # noqa: E402


def _save(out: str, seen: list) -> None:
    np.savez(out, *seen)


def keras_trainer(endpoint: str, ckpt_dir: str, out: str, epochs: int, crash_at: int) -> None:
    import keras

    from ringfeed.keras import StreamCheckpoint

    class Recorder(keras.Model):
        seen: list = []

        def train_step(self, data):
            Recorder.seen.append(np.array(data[0]))
            return super().train_step(data)

    class Crash(keras.callbacks.Callback):
        step = 0

        def on_train_batch_end(self, batch, logs=None):
            if Crash.step == crash_at:
                _save(out, Recorder.seen)
                os._exit(0)
            Crash.step += 1

    ckpt = StreamCheckpoint(ckpt_dir, save_freq=1)
    model = ckpt.load_model(custom_objects={"Recorder": Recorder})
    if model is None:
        inputs = keras.Input((8, 8, 2))
        model = Recorder(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(inputs)))
        model.compile(optimizer="sgd", loss="mse")
    model.run_eagerly = True  # train_step sees each batch's values
    with Feed(endpoint, start=ckpt.position) as feed:
        model.fit(feed.keras_input(), epochs=epochs, initial_epoch=ckpt.initial_epoch,
                  callbacks=[ckpt, Crash()], verbose=0)
    _save(out, Recorder.seen)


def torch_trainer(endpoint: str, state_path: str, out: str, steps: int, crash_at: int) -> None:
    seen = []
    with Feed(endpoint) as feed:
        if os.path.exists(state_path):
            feed.load_state_dict(json.loads(Path(state_path).read_text()))
        for step, (x, y) in enumerate(feed.torch_generator()):
            seen.append(x.numpy().copy())
            del x, y  # the lent slot goes back before the state is taken
            Path(state_path).write_text(json.dumps(feed.state_dict()))
            if step == crash_at:
                _save(out, seen)
                os._exit(0)
            if feed.position == divmod(steps, feed.steps_per_epoch):
                break
    _save(out, seen)


if __name__ == "__main__":
    kind, endpoint, path, out, count, crash = sys.argv[1:]
    trainer = keras_trainer if kind == "keras" else torch_trainer
    trainer(endpoint, path, out, int(count), int(crash))
