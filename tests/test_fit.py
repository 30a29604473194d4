"""Keras model.fit trained through ringfeed on scikit-learn's digits (nothing downloaded)."""

import gc
import re
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("sklearn")


def test_demo_command_trains_through_the_generator():
    out = subprocess.run([sys.executable, "-m", "ringfeed.server.cli", "demo", "--epochs", "8"],
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    accuracy = float(re.search(r"validation accuracy\s+([\d.]+)", out.stdout).group(1))
    assert accuracy >= 0.9
    assert re.search(r"loader delivered\s+\d+ samples/s", out.stdout)
    assert "Epoch 8/8" in out.stdout and "ringfeed stopped" in out.stdout


def test_model_fit_through_as_tf_dataset():
    from ringfeed.server.demo import run_demo

    result = run_demo(epochs=8, use_tf_dataset=True)
    assert result["val_accuracy"] >= 0.9
    assert result["batches_served"] >= 8 * 46


def test_fits_one_after_another_on_one_feed_do_not_pin_ring_slots(name):
    """Keras keeps the first batches of each generator past the end of its fit; had they been
    lent, each fit would pin two more slots until the workers had none."""
    import keras
    import numpy as np
    from conftest import leased_slots, rgb_images

    from ringfeed import Feed
    from ringfeed.server import Config, Service

    images, labels = rgb_images(64, 8), np.arange(64) % 4
    config = Config(batch_size=4, workers=1, slots=8, name=name, seed=2)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(4)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with Service(config, features=images, labels=labels) as svc, Feed(svc.endpoint, prefetch=2) as feed:
        for _ in range(5):
            model.fit(feed.generator(), steps_per_epoch=6, epochs=1, verbose=0, shuffle=False)
        # tf.data's prefetch of the last fit still lends batches until its iterator is collected,
        # and their slots go back with the feed's next ACK, which the next two reads send.
        gc.collect()
        feed.next_batch(copy=True)
        feed.next_batch(copy=True)
        held = leased_slots(svc.endpoint, at_most=2)
    assert held <= 2  # the feed's prefetch; pinned slots would have kept all 8 leased


def _two_in_two_out_model():
    import keras
    from keras import layers

    inputs = {"image": keras.Input((8, 8, 3), name="image"), "meta": keras.Input((16,), name="meta")}
    flat = layers.Flatten()(layers.Rescaling(1 / 255)(inputs["image"]))
    hidden = layers.Dense(16, activation="relu")(layers.Concatenate()([flat, inputs["meta"]]))
    outputs = {"cls": layers.Dense(4, name="cls")(hidden), "box": layers.Dense(4, name="box")(hidden)}
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss={"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "box": "mse"})
    return model


def test_a_two_input_two_output_model_fits_with_sample_weights_that_reach_the_loss(name):
    import numpy as np
    from conftest import rgb_images

    from ringfeed import Feed
    from ringfeed.server import Config, Service

    rng = np.random.default_rng(0)
    data = {"image": rgb_images(128, 8), "meta": rng.random((128, 16), dtype=np.float32),
            "cls": np.arange(128) % 4, "box": rng.random((128, 4), dtype=np.float32)}
    config = Config(batch_size=16, workers=1, name=name, inputs=["image", "meta"], targets=["cls", "box"],
                    sample_weight="weight")
    losses = {}
    for weight in (1.0, 0.0):
        model = _two_in_two_out_model()
        fields = {**data, "weight": np.full(128, weight, np.float32)}
        with Service(config.with_overrides(name=f"{name}{weight:.0f}"), fields=fields) as svc, \
                Feed(svc.endpoint) as feed:
            x_spec, y_spec, w_spec = feed.as_tf_dataset().element_spec
            assert set(x_spec) == {"image", "meta"} and set(y_spec) == {"cls", "box"}
            assert x_spec["image"].name == "image" and w_spec.name == "weight" and w_spec.shape == (16,)
            first = model.fit(feed.generator(), steps_per_epoch=8, epochs=3, verbose=0, shuffle=False).history["loss"]
            second = model.fit(feed.as_tf_dataset(), steps_per_epoch=8, epochs=1, verbose=0,
                               shuffle=False).history["loss"]
        losses[weight] = first + second
    assert all(loss > 0 for loss in losses[1.0]) and losses[1.0][-1] < losses[1.0][0]
    assert losses[0.0] == [0.0] * 4  # every sample weighted 0: nothing reaches the loss
