"""Train a small Keras convnet on batches from ringfeed (the compose ``trainer`` service).

Environment:

- ``RINGFEED_ENDPOINT``: the loader, e.g. ``tcp://loader:5555`` or
  ``ipc:///dev/shm/ringfeed-loader.sock``; several loaders comma-separated
  (``tcp://ringfeed-loader-1:5555,tcp://ringfeed-loader-2:5555``) or as a
  range (``tcp://ringfeed-loader-{1..2}:5555``).
- ``EPOCHS`` (2), ``NUM_CLASSES`` (10), ``RINGFEED_TIMEOUT_S`` (30).
- ``RINGFEED_TRANSPORT``: ``shm`` (map the loader's ring: same IPC namespace;
  fails loudly otherwise), ``frames`` (batch bytes over the socket, any host)
  or unset for the client's default, ``auto``.
- ``RINGFEED_CURVE_SERVER_KEY`` and ``RINGFEED_CURVE_SECRET_KEY``: the
  server's public key file and this client's secret key file, for a CURVE
  server (``ringfeed keys DIR`` makes both).

Prints the stream's spec, then steps/s and the time spent waiting for data
per epoch. Exits non-zero if the loader cannot be reached.
"""

from __future__ import annotations

import os
import sys
import time


def endpoints_from_env() -> str | list[str]:
    from ringfeed.endpoints import expand_endpoints

    raw = os.environ.get("RINGFEED_ENDPOINT", "tcp://loader:5555").strip()
    if not raw:
        raise SystemExit("RINGFEED_ENDPOINT is empty; set it to e.g. tcp://loader:5555")
    try:
        endpoints = expand_endpoints(raw)
    except ValueError as exc:
        raise SystemExit(f"RINGFEED_ENDPOINT: {exc}") from None
    return endpoints[0] if len(endpoints) == 1 else endpoints


def build_model(spec, num_classes: int):
    import keras
    from keras import layers

    x_shape = tuple(spec.field("features").shape)
    if len(x_shape) == 3:  # (H, W, C) images
        body = [layers.Conv2D(16, 3, strides=2, padding="same", activation="relu"),
                layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
                layers.Conv2D(64, 3, strides=2, padding="same", activation="relu"),
                layers.GlobalAveragePooling2D()]
    else:  # (D,) feature vectors
        body = [layers.Flatten(), layers.Dense(64, activation="relu")]
    model = keras.Sequential([keras.Input(shape=x_shape), *body,
                              layers.Dense(num_classes, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def make_throughput_callback(feed):
    import keras

    class Throughput(keras.callbacks.Callback):
        """Per epoch: steps/s, samples/s and the seconds model.fit waited on ringfeed."""

        def on_epoch_begin(self, epoch, logs=None):
            self.started, self.waited = time.perf_counter(), feed.stats["wait_s"]

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.started
            steps = feed.steps_per_epoch
            print(f"epoch {epoch + 1}: {steps / seconds:.1f} steps/s, "
                  f"{steps * feed.spec.batch_size / seconds:.0f} samples/s, "
                  f"waited {feed.stats['wait_s'] - self.waited:.2f} s for data "
                  f"(loss {logs.get('loss', float('nan')):.3f}, "
                  f"accuracy {logs.get('accuracy', float('nan')):.3f})", flush=True)

    return Throughput()


def main() -> int:
    from ringfeed import open_feed

    endpoint = endpoints_from_env()
    epochs = int(os.environ.get("EPOCHS", 2))
    num_classes = int(os.environ.get("NUM_CLASSES", 10))
    options = {"curve_server_key": os.environ.get("RINGFEED_CURVE_SERVER_KEY"),
               "curve_secret_key": os.environ.get("RINGFEED_CURVE_SECRET_KEY"),
               "transport": os.environ.get("RINGFEED_TRANSPORT")}
    feed = open_feed(endpoint, timeout_s=float(os.environ.get("RINGFEED_TIMEOUT_S", 30)),
                     **{k: v for k, v in options.items() if v})
    with feed:
        print(f"ringfeed at {endpoint}: {feed.spec}", flush=True)
        model = build_model(feed.spec, num_classes)
        started = time.perf_counter()
        model.fit(feed.generator(), steps_per_epoch=feed.steps_per_epoch, epochs=epochs, shuffle=False,
                  callbacks=[make_throughput_callback(feed)], verbose=2)  # the stream is shuffled
        seconds = time.perf_counter() - started
        steps = epochs * feed.steps_per_epoch
        print(f"trained {epochs} epoch(s), {steps} steps in {seconds:.1f} s: {steps / seconds:.1f} steps/s "
              f"overall (first epoch includes compilation); waited {feed.stats['wait_s']:.2f} s "
              f"for data in all", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
