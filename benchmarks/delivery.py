"""Delivery overhead of the zero-copy path, with workers that do (almost) nothing.

A tiny float32 dataset (N, 4), no augmentation and batch 1 by default, so the
rate is set by the path itself: client -> broker -> worker -> broker -> client,
per batch, on one ring. Measured for ``feed.next_batch()`` and for
``feed.generator()``, each on a service of its own with 1 up to all cores as
workers, round-robin over rounds.

Reported per contender (medians over rounds): batches/s, the client's CPU
time per batch (process CPU time of this consumer process, every thread, over
the timed loop / batches), and the server's CPU time per batch, broker and
workers apart. The Benchmarks issue's targets: >= 6,500 batches/s and
<= 50 us of client CPU per batch.

    .venv/bin/python benchmarks/delivery.py [--quick] [--rounds N] [--out DIR | --write-results]
"""

from __future__ import annotations

import time
from contextlib import ExitStack

import numpy as np

import benchlib
from benchlib import SEED, log

TARGET_BATCHES_PER_S = 6500
TARGET_CLIENT_US = 50.0
FEATURES = 4


class Route:
    """One way of taking batches: ``next_batch`` or the generator, from a service of its own."""

    def __init__(self, svc, workers: int, batch_size: int, use_generator: bool):
        from ringfeed import Feed

        how = "generator" if use_generator else "next_batch"
        self.name = f"{how}-w{workers}"
        self.label = f"feed.{how}(), batch {batch_size}, {workers} worker{'s' * (workers > 1)}"
        self.svc, self.workers, self.batch_size = svc, workers, batch_size
        self.feed = Feed(svc.endpoint)
        if use_generator:
            gen = self.feed.generator()
            self.fetch = lambda: next(gen)
        else:
            self.fetch = self.feed.next_batch
        self.rounds: list[dict] = []

    def server_cpu_s(self) -> tuple[float, float]:
        """(broker, workers) CPU seconds so far: the service process is the broker; its children work."""
        return (benchlib.process_cpu_s(self.svc.pid),
                sum(benchlib.process_cpu_s(pid) for pid in benchlib.child_pids(self.svc.pid)))

    def measure(self, seconds: float, warmup: int) -> dict:
        for _ in range(warmup):
            self.fetch()
        with benchlib.OtherLoad() as load:
            broker0, workers0 = self.server_cpu_s()
            cpu0 = time.process_time()
            batches, elapsed = benchlib.timed(self.fetch, seconds, 0)
            cpu = time.process_time() - cpu0
            broker1, workers1 = self.server_cpu_s()
        return {"batches_per_s": batches / elapsed, "batches": batches, "seconds": elapsed,
                "other_load": load.share,
                "client_cpu_us_per_batch": cpu / batches * 1e6,
                "broker_cpu_us_per_batch": (broker1 - broker0) / batches * 1e6,
                "workers_cpu_us_per_batch": (workers1 - workers0) / batches * 1e6}

    def stop(self) -> None:
        self.feed.close()


def summarize(routes: list[Route]) -> list[dict]:
    rows = []
    for route in routes:
        row = {"name": route.name, "label": route.label, "workers": route.workers,
               "batch_size": route.batch_size}
        for key in ("batches_per_s", "client_cpu_us_per_batch", "broker_cpu_us_per_batch",
                    "workers_cpu_us_per_batch"):
            row[f"median_{key}"] = benchlib.median(r[key] for r in route.rounds)
        row["meets_targets"] = (row["median_batches_per_s"] >= TARGET_BATCHES_PER_S
                                and row["median_client_cpu_us_per_batch"] <= TARGET_CLIENT_US)
        row["rounds"] = route.rounds
        rows.append(row)
    return rows


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0], rounds=5, quick_rounds=2)
    p.add_argument("--batch-size", type=int, default=1, help="samples per batch (default 1)")
    p.add_argument("--seconds", type=float, help="timed seconds per contender per round (default 3, 0.3 quick)")
    args = benchlib.parse(p)
    seconds = args.seconds or (0.3 if args.quick else 3.0)
    warmup = 50 if args.quick else 500
    samples = 4096 if args.quick else 65536

    from ringfeed.server import Config, Service

    rng = np.random.default_rng(SEED)
    features = rng.standard_normal((samples, FEATURES), dtype=np.float32)
    labels = rng.integers(0, 10, samples, dtype=np.int64)
    result = benchlib.header("delivery", args, samples=samples, features=FEATURES, batch_size=args.batch_size,
                             seconds_per_round=seconds, warmup_batches_per_round=warmup, augment=[],
                             targets={"batches_per_s": TARGET_BATCHES_PER_S,
                                      "client_cpu_us_per_batch": TARGET_CLIENT_US})
    with ExitStack() as stack:
        routes: list[Route] = []
        for w in benchlib.worker_counts():
            for use_generator in (False, True):
                log(f"starting a ringfeed service with {w} worker(s)")
                config = Config(batch_size=args.batch_size, workers=w, seed=SEED,
                                name=benchlib.service_name("dl", f"{'g' if use_generator else 'n'}{w}"))
                svc = stack.enter_context(Service(config, features=features, labels=labels))
                routes.append(Route(svc, w, args.batch_size, use_generator))
                stack.callback(routes[-1].stop)
        for r in range(args.rounds):
            shift = r % len(routes)
            for route in routes[shift:] + routes[:shift]:
                route.rounds.append(route.measure(seconds, warmup))
                m = route.rounds[-1]
                log(f"[round {r + 1}/{args.rounds}] {route.name:<14} {m['batches_per_s']:>8,.0f} batches/s, "
                    f"client {m['client_cpu_us_per_batch']:.0f} us/batch  (other processes: "
                    f"{m['other_load']:.0%} of the cores)")

    rows = summarize(routes)
    result["routes"] = rows
    benchlib.write_json(args.out / "delivery.json", result)
    print(f"{'route':<16}{'batches/s':>11}{'client us':>11}{'broker us':>11}{'workers us':>12}  targets")
    for row in rows:
        print(f"{row['name']:<16}{row['median_batches_per_s']:>11,.0f}{row['median_client_cpu_us_per_batch']:>11.1f}"
              f"{row['median_broker_cpu_us_per_batch']:>11.1f}{row['median_workers_cpu_us_per_batch']:>12.1f}  "
              f"{'met' if row['meets_targets'] else 'missed'}")


if __name__ == "__main__":
    main()
