"""``ringfeed demo``: train a small Keras convnet on scikit-learn's digits through ringfeed.

The 8x8 digits (bundled with scikit-learn, nothing is downloaded) are scaled to
uint8 and upscaled to 32x32 so that shifting crops make sense. The service runs
in the background, exactly as ``ringfeed start`` runs it, and is stopped at
the end.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from ringfeed import Feed
from ringfeed.paths import ensure_runtime_dir
from ringfeed.status import query_status

from . import background
from .config import load_toml

NAME = "demo"
SEED = 7
UPSCALE = 4
VAL_SAMPLES = 297
MEAN, STD = 0.5, 0.5
DEMO_TOML = f"""
batch_size = 32
seed = {SEED}

[[augment]]
op = "random_crop"
size = [32, 32]
padding = 3

[[augment]]
op = "brightness"
max_delta = 0.1

[[augment]]
op = "contrast"
lower = 0.8
upper = 1.2

[[augment]]
op = "normalize"
mean = [{MEAN}]
std = [{STD}]
"""


def digits(folder) -> tuple[np.ndarray, np.ndarray]:
    """Write the training split to ``folder`` as .npy files; return the validation split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images / 16.0 * 255.0).astype(np.uint8)
    images = images.repeat(UPSCALE, axis=1).repeat(UPSCALE, axis=2)[..., None]
    order = np.random.default_rng(SEED).permutation(len(images))
    train, val = order[VAL_SAMPLES:], order[:VAL_SAMPLES]
    np.save(folder / "features.npy", images[train])
    np.save(folder / "labels.npy", data.target[train].astype(np.int64))
    val_x = (images[val].astype(np.float32) / 255.0 - MEAN) / STD
    return val_x, data.target[val].astype(np.int64)


def build_model(input_shape):
    import keras

    keras.utils.set_random_seed(SEED)
    model = keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def run_demo(epochs: int = 8, workers: int | None = None, use_tf_dataset: bool = False) -> dict:
    runtime = ensure_runtime_dir()
    folder = runtime / "demo-data"
    folder.mkdir(exist_ok=True)
    val_x, val_y = digits(folder)
    config = runtime / "demo.toml"
    config.write_text(DEMO_TOML)
    options = load_toml(config, data=str(folder), name=NAME, workers=workers)
    print(f"starting ringfeed on {len(val_x)} + {len(np.load(folder / 'labels.npy'))} digits ...")
    state = background.start(options, timeout_s=300)
    print(f"ringfeed started: pid {state['pid']}, endpoint {state['endpoint']}")
    try:
        with Feed(state["endpoint"]) as feed:
            model = build_model(feed.spec.field("features").shape)
            # a tf.data.Dataset is endless, so Keras needs the epoch's length; keras_input() is one epoch long
            source, steps = (feed.as_tf_dataset(), feed.steps_per_epoch) if use_tf_dataset else (feed.keras_input(), None)
            started = time.perf_counter()
            model.fit(source, steps_per_epoch=steps, epochs=epochs, shuffle=False,
                      verbose=1 if sys.stdout.isatty() else 2)
            wall = time.perf_counter() - started
            status = query_status(state["endpoint"]) or {}
            _, val_accuracy = model.evaluate(val_x, val_y, verbose=0)
            result = {
                "val_accuracy": float(val_accuracy),
                "train_wall_s": wall,
                "loader_samples_per_s": feed.stats["batches"] * feed.spec.batch_size / wall,
                "trainer_wait_s": feed.stats["wait_s"],
                "batches_served": status.get("batches_served"),
            }
    finally:
        background.stop(NAME)
    waiter = "tf.data's producer thread" if use_tf_dataset else "Keras' input thread"
    print(f"validation accuracy      {result['val_accuracy']:.3f}\n"
          f"loader delivered         {result['loader_samples_per_s']:.0f} samples/s "
          f"over {wall:.1f} s of training\n"
          f"waited for data          {result['trainer_wait_s']:.2f} s ({waiter}), "
          f"{100 * result['trainer_wait_s'] / wall:.1f}% of training time\n"
          f"ringfeed stopped (pid {state['pid']}); nothing was downloaded")
    return result
