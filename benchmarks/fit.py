"""Keras ``model.fit`` end to end: training steps per second with each input pipeline.

A small convnet, Conv2D(16, 3, strides=2) -> GlobalAveragePooling2D -> Dense(10),
trains on the throughput workload's 56x56x3 float32 batches of 256, fed by
each contender. The same model on one repeated in-memory batch is the ceiling:
what the trainer does when data costs nothing. The generator path is the same
batch yielded by a Python generator: what Keras' per-step Python (a
``from_generator`` reader and the hand-over to the step) costs, on every
input that is a generator, ringfeed's included, before any loading. The
generator ring yields ``RING_BATCHES`` distinct in-memory batches in turn, as
a ring of slots would: batches that are no longer hot in cache, and, as numpy
allocates them, not 64-byte aligned, so TensorFlow copies them.

Each contender gets its own freshly initialised model (same seed), traced by an
untimed fit first. Then rounds, round-robin: one ``model.fit`` per contender per
round, timed by a callback from the end of step ``--warmup`` to the end of the
last step, so start-up and Keras' peek at the first batches stay outside.

Input stall: the share of that wall time the input reader spent waiting for a
batch. For ringfeed it is ``feed.stats["wait_s"]`` (time blocked on the
server); for the classic generator, the time inside its ``next()``, where the
batch is computed. Keras pulls generators from a prefetching tf.data thread,
so the trainer waits less than that once the reader keeps ahead. tf.data
inputs are read inside the compiled train step, where no wait is visible from
Python: for those only the ratio to the ceiling tells.

Autotuned workers (``workers = "auto"``, up to the core count) ride along
beside the hand-picked counts (1, 2, 4, ... cores): each auto route's steps/s
over the best hand-picked count's, as a ratio of medians and as the median of
each round's own ratio. Then a loader-only phase pulls each generator feed
with nothing else to do (round-robin, ``LOADER_SETTLE_S`` untimed first, the
same for every count, in which auto finds its count) and compares the same
way, in samples/s. The issue's target for both: auto >= 0.95x the best.

    .venv/bin/python benchmarks/fit.py [--quick] [--rounds N] [--out DIR | --write-results]
"""

from __future__ import annotations

import gc
import time
from contextlib import ExitStack

import benchlib
from benchlib import AUGMENT, BATCH, CLASSES, CROP, IMAGE, SEED, log

RING_BATCHES = 32  # the default ring's slots for 2 workers
AUTO = "auto"
AUTO_TARGET = 0.95  # the bar: auto within 5% of the best hand-picked worker count
LOADER_SETTLE_S = 2.0  # untimed pulling before each loader-only measurement (0.5 quick)
LOADER_SECONDS = 3.0  # timed pulling per loader-only measurement (0.5 quick)


def repeat(batch):
    """``batch`` forever, from a generator: Keras takes only real generators (``types.GeneratorType``)."""
    while True:
        yield batch


class Input:
    """One way of feeding model.fit. ``data(round)`` gives the fit input for a round and
    ``waited()`` the reader's cumulative wait in seconds (None where it cannot be seen)."""

    group = "peer"

    def __init__(self, name: str, label: str, workers: int | None = None):
        self.name, self.label, self.workers = name, label, workers
        self.rounds: list[dict] = []

    def data(self, round_: int):
        raise NotImplementedError

    def waited(self) -> float | None:
        return None

    def stop(self) -> None:
        pass


class Ceiling(Input):
    def __init__(self, features, labels):
        import numpy as np
        import tensorflow as tf

        super().__init__("ceiling", "model alone, one in-memory batch")
        x, y = benchlib.classic_batch(features, labels, np.random.default_rng(SEED))
        self.dataset = tf.data.Dataset.from_tensors((x, y)).repeat()

    def data(self, round_: int):
        return self.dataset


class GeneratorPath(Ceiling):
    def __init__(self, features, labels):
        super().__init__(features, labels)
        self.name, self.label = "generator-path", "model alone, one in-memory batch from a Python generator"
        self.batch = next(iter(self.dataset.as_numpy_iterator()))

    def data(self, round_: int):
        return repeat(self.batch)


class GeneratorRing(Ceiling):
    def __init__(self, features, labels):
        import numpy as np

        super().__init__(features, labels)
        self.name = "generator-ring"
        self.label = f"model alone, {RING_BATCHES} in-memory batches in turn from a Python generator"
        rng = np.random.default_rng(SEED)
        self.batches = [benchlib.classic_batch(features, labels, rng) for _ in range(RING_BATCHES)]

    def data(self, round_: int):
        def turn():
            while True:
                yield from self.batches

        return turn()


class TfData(Input):
    def __init__(self, features, labels):
        super().__init__("tf.data", "tf.data map(AUTOTUNE)")
        self.dataset = benchlib.tf_pipeline(features, labels)

    def data(self, round_: int):
        return self.dataset


class TimedReader(Input):
    """An input whose wait is the time spent inside its reader's ``next()``."""

    def __init__(self, name: str, label: str, workers: int | None = None):
        super().__init__(name, label, workers)
        self.clock = 0.0

    def timed(self, batches):
        while True:
            start = time.perf_counter()
            batch = next(batches)
            self.clock += time.perf_counter() - start
            yield batch

    def waited(self) -> float:
        return self.clock


class Classic(TimedReader):
    def __init__(self, features, labels):
        super().__init__("classic-generator", "classic Python generator")
        self.features, self.labels = features, labels

    def data(self, round_: int):
        return self.timed(benchlib.classic_generator(self.features, self.labels, seed=SEED + round_))


def ringfeed_contender(route: str, workers: int | str) -> tuple[str, str]:
    """(name, label) of a ringfeed contender with ``workers`` a count or ``"auto"``."""
    if workers != AUTO:
        return benchlib.ringfeed_contender(route, workers)
    name, label = benchlib.ringfeed_contender(route, 1)
    return name.removesuffix("-w1") + "-auto", label.replace("1 worker", 'workers = "auto"')


class RingfeedGenerator(Input):
    """A feed of its own service, open for the whole run (an idle feed holds slots of its service)."""

    group = "ringfeed"

    def __init__(self, endpoint: str, workers: int | str, **feed_options):
        from ringfeed import Feed

        super().__init__(*ringfeed_contender("generator", workers), workers)
        self.endpoint = endpoint
        self.feed = Feed(endpoint, **feed_options)
        self.loader_rounds: list[float] = []  # loader-only samples/s

    def data(self, round_: int):
        return self.feed.generator()

    def waited(self) -> float:
        return self.feed.stats["wait_s"]

    def stop(self) -> None:
        self.feed.close()


class RingfeedTfDataset(RingfeedGenerator):
    def __init__(self, endpoint: str, workers: int):
        super().__init__(endpoint, workers)
        self.name, self.label = ringfeed_contender("tf-dataset", workers)

    def data(self, round_: int):
        return self.feed.as_tf_dataset()


def build_model():
    import keras

    keras.utils.set_random_seed(SEED)
    model = keras.Sequential([
        keras.Input((*CROP, IMAGE[2])),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(CLASSES),
    ])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit_once(model, source: Input, round_: int, warmup: int, steps: int) -> dict:
    """One model.fit of warmup + steps; the timed window is the last ``steps`` steps."""
    import keras

    marks = {}

    def on_batch_end(batch, logs=None):
        if batch in (warmup - 1, warmup + steps - 1):
            marks[batch] = (time.perf_counter(), source.waited(), benchlib.cpu_snapshot())

    model.fit(source.data(round_), steps_per_epoch=warmup + steps, epochs=1, verbose=0, shuffle=False,
              callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=on_batch_end)])
    gc.collect()  # let the last fit's readers go before anyone is timed again
    (t0, w0, cpu0), (t1, w1, cpu1) = marks[warmup - 1], marks[warmup + steps - 1]
    return {"steps_per_s": steps / (t1 - t0), "seconds": t1 - t0, "steps": steps,
            "stall_share": None if w0 is None else (w1 - w0) / (t1 - t0),
            "other_load": benchlib.other_load(cpu0, cpu1, t1 - t0)}


def summarize(inputs: list[Input], references: dict[str, str]) -> list[dict]:
    """One row per input; ``references`` maps each ratio's key to the input it divides by."""
    rows = []
    for s in inputs:
        stalls = [r["stall_share"] for r in s.rounds]
        rows.append({"name": s.name, "label": s.label, "group": s.group, "workers": s.workers,
                     "median_steps_per_s": benchlib.median(r["steps_per_s"] for r in s.rounds),
                     "median_stall_share": None if None in stalls else benchlib.median(stalls),
                     "rounds": s.rounds})
    # This host slows down by up to half for minutes at a time, so ratios of medians taken from
    # different rounds drift; each round's own ratio to the ceiling (its fits run close together)
    # drifts less, but is noisy too. Both are reported.
    medians = {row["name"]: row["median_steps_per_s"] for row in rows}
    ceiling = [r["steps_per_s"] for r in next(s for s in inputs if s.name == "ceiling").rounds]
    for row in rows:
        for key, reference in references.items():
            row[key] = benchlib.ratio(row["median_steps_per_s"], medians[reference])
        row["round_ratio_to_ceiling"] = benchlib.median(
            r["steps_per_s"] / c for r, c in zip(row["rounds"], ceiling))
    return rows


def run_rounds(inputs: list[Input], rounds: int, warmup: int, steps: int) -> None:
    """Trace a fresh model per input, then ``rounds`` interleaved rounds of one fit per input."""
    models = {}
    for s in inputs:
        log(f"tracing the model on {s.label}")
        models[s.name] = build_model()
        fit_once(models[s.name], s, 0, warmup, 2)
    for r in range(rounds):
        shift = r % len(inputs)
        for s in inputs[shift:] + inputs[:shift]:
            s.rounds.append(fit_once(models[s.name], s, r + 1, warmup, steps))
            stall = s.rounds[-1]["stall_share"]
            log(f"[round {r + 1}/{rounds}] {s.name:<24} {s.rounds[-1]['steps_per_s']:>7.1f} steps/s"
                + ("" if stall is None else f", input stall {stall:.0%}")
                + f"  (other processes: {s.rounds[-1]['other_load']:.0%} of the cores)")


def loader_rounds(feeds: list[RingfeedGenerator], rounds: int, seconds: float, settle_s: float) -> None:
    """Loader-only: pull each feed's generator with nothing else to do, round-robin; each
    measurement ``settle_s`` untimed first, then ``seconds`` timed. Samples/s in ``loader_rounds``."""
    for r in range(rounds):
        shift = r % len(feeds)
        for s in feeds[shift:] + feeds[:shift]:
            batches = s.feed.generator()
            settled = time.perf_counter() + settle_s
            while time.perf_counter() < settled:
                next(batches)
            count, elapsed = benchlib.timed(lambda: next(batches), seconds, 0)
            s.loader_rounds.append(count * BATCH / elapsed)
            log(f"[loader-only {r + 1}/{rounds}] {s.name:<24} {s.loader_rounds[-1]:>10,.0f} samples/s")


def auto_versus_best(auto: list[float], picked: dict[str, list[float]]) -> dict:
    """auto's rounds against each hand-picked count's (same rounds, same order): the ratio of
    medians to the best median, and the median of each round's ratio to that round's best."""
    medians = {name: benchlib.median(values) for name, values in picked.items()}
    best = max(medians, key=medians.get)
    per_round = [a / max(values[r] for values in picked.values()) for r, a in enumerate(auto)]
    return {"auto": benchlib.median(auto), "best": best, "best_median": medians[best],
            "ratio": benchlib.median(auto) / medians[best], "median_round_ratio": benchlib.median(per_round),
            "target": AUTO_TARGET}


def autotune_comparisons(inputs: list[Input], fit_steps: list[Input], feeds: list[RingfeedGenerator]) -> list:
    """The issue's two autotune figures: model.fit steps/s per route, and loader-only samples/s."""
    comparisons = []
    for route in ("generator", "tf-dataset"):
        picked = {s.name: [r["steps_per_s"] for r in s.rounds] for s in inputs
                  if s.group == "ringfeed" and s.name.startswith(f"ringfeed-{route}-w")}
        auto = next(s for s in fit_steps if s.name == f"ringfeed-{route}-auto")
        comparisons.append({"what": f"model.fit steps/s, {route}",
                            **auto_versus_best([r["steps_per_s"] for r in auto.rounds], picked)})
    picked = {s.name: s.loader_rounds for s in feeds if s.workers != AUTO}
    auto = next(s for s in feeds if s.workers == AUTO)
    comparisons.append({"what": "loader-only samples/s, generator", **auto_versus_best(auto.loader_rounds, picked)})
    return comparisons


def workers_active(endpoint: str) -> int | None:
    from ringfeed.status import query_status

    return (query_status(endpoint) or {}).get("workers_active")


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0], rounds=5, quick_rounds=2)
    p.add_argument("--steps", type=int, help="timed steps per fit (default 300, 15 quick)")
    p.add_argument("--warmup", type=int, help="untimed steps at the start of each fit (default 20, 3 quick)")
    p.add_argument("--samples", type=int, help="dataset size (default 20000, 2048 quick)")
    args = benchlib.parse(p)
    steps = args.steps or (15 if args.quick else 300)
    warmup = args.warmup or (3 if args.quick else 20)  # past the 16 batches a feed prefetches
    samples = args.samples or (2048 if args.quick else 20000)

    features, labels = benchlib.make_images(samples)
    result = benchlib.header("fit", args, samples=samples, batch_size=BATCH, steps=steps, warmup_steps=warmup,
                             model="Conv2D(16, 3, strides=2, relu) -> GlobalAveragePooling2D -> Dense(10), adam",
                             augment=AUGMENT)
    with ExitStack() as stack:
        inputs: list[Input] = [Ceiling(features, labels), GeneratorPath(features, labels),
                               GeneratorRing(features, labels), TfData(features, labels), Classic(features, labels)]
        for kind, w, endpoint in benchlib.ringfeed_services(stack, "fit", (RingfeedGenerator, RingfeedTfDataset),
                                                            features, labels):
            inputs.append(kind(endpoint, w))
            stack.callback(inputs[-1].stop)
        autos: list[Input] = []
        for kind, w, endpoint in benchlib.ringfeed_services(stack, "fit", (RingfeedGenerator, RingfeedTfDataset),
                                                            features, labels, counts=[AUTO]):
            autos.append(kind(endpoint, w))
            stack.callback(autos[-1].stop)
        run_rounds(inputs + autos, args.rounds, warmup, steps)
        active_after_fit = {s.name: workers_active(s.endpoint) for s in autos}
        feeds = [s for s in inputs + autos if type(s) is RingfeedGenerator]
        loader_rounds(feeds, args.rounds, *((0.5, 0.5) if args.quick else (LOADER_SECONDS, LOADER_SETTLE_S)))
        active_after_loader = {s.name: workers_active(s.endpoint) for s in autos}

    rows = summarize(inputs + autos, {"ratio_to_ceiling": "ceiling", "ratio_to_tf_data": "tf.data",
                                      "ratio_to_generator_path": "generator-path"})
    auto_names = {s.name for s in autos}
    result["inputs"] = [row for row in rows if row["name"] not in auto_names]
    result["autotune"] = {
        "inputs": [row for row in rows if row["name"] in auto_names],
        "loader_only": {s.name: {"workers": s.workers, "median_samples_per_s": benchlib.median(s.loader_rounds),
                                 "rounds": s.loader_rounds} for s in feeds},
        "loader_seconds": 0.5 if args.quick else LOADER_SECONDS,
        "loader_settle_s": 0.5 if args.quick else LOADER_SETTLE_S,
        "workers_active_after_fit": active_after_fit, "workers_active_after_loader_only": active_after_loader,
        "comparisons": autotune_comparisons(inputs, autos, feeds)}
    benchlib.write_json(args.out / "fit.json", result)
    print_table(rows, {"x ceiling": "ratio_to_ceiling", "per round": "round_ratio_to_ceiling",
                       "x gen path": "ratio_to_generator_path", "x tf.data": "ratio_to_tf_data"})
    for c in result["autotune"]["comparisons"]:
        print(f"auto / best hand-picked ({c['best']}), {c['what']}: {c['ratio']:.2f}x "
              f"(per round {c['median_round_ratio']:.2f}x), target >= {c['target']:g}x")
    print(f"workers active with auto: after the fits {active_after_fit}, after loader-only {active_after_loader}")


def print_table(rows: list[dict], ratios: dict[str, str]) -> None:
    """The summary on stdout: steps/s, the ratios (column header -> row key), input stall."""
    print(f"{'input':<26}{'steps/s':>9}" + "".join(f"{header:>11}" for header in ratios) + f"{'stall':>8}")
    for row in rows:
        stall = "-" if row["median_stall_share"] is None else f"{row['median_stall_share']:.0%}"
        print(f"{row['name']:<26}{row['median_steps_per_s']:>9.1f}"
              + "".join(f"{row[key]:>11.2f}" for key in ratios.values()) + f"{stall:>8}")


if __name__ == "__main__":
    main()
