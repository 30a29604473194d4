"""Remote delivery over loopback TCP: ringfeed's frames transport against raw pyzmq.

The baseline is the wire itself: a sender process pushes one preallocated
batch-sized buffer with ``copy=False`` as fast as ZeroMQ takes it, and this
process receives it with ``copy=False`` and wraps it in numpy, as the client
does. A second raw sender sends ``RING_BUFFERS`` buffers in turn, as a ring
of distinct batches is sent: the kernel then copies from memory, not from a
buffer hot in cache. A third makes each batch before sending it, with the
workload's own work on one core (numpy's gather, or ringfeed's augmentation
kernel), into one of ``RING_BUFFERS`` buffers that it reuses only once
ZeroMQ's tracker says it has been sent: a hand-written single-process loader.
Against them, in the same run and round-robin: one ringfeed server sending
its slots as frames, three servers on three loopback ports fanned into one
client, and, for reference, the zero-copy shm path. Reported: median MB/s of
delivered x bytes and samples/s; the Scale-out issue's target is ringfeed TCP
>= 0.8x raw pyzmq.

    .venv/bin/python benchmarks/remote.py [--quick] [--rounds N] [--out DIR | --write-results]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
from contextlib import ExitStack

import numpy as np

import benchlib
from benchlib import AUGMENT, BATCH, CROP, IMAGE, SEED, log

TARGET_RATIO = 0.8
RING_BUFFERS = 16
RECV_TIMEOUT_MS = 10_000


def workload(name: str, samples: int):
    """(features, labels, augment) of a workload, made the same way in every process."""
    if name == "gather":
        samples = min(samples, 2048)
        features = np.random.default_rng(SEED).random((samples, *CROP, IMAGE[2]), dtype=np.float32)
        return features, np.arange(samples), []
    return (*benchlib.make_images(samples), AUGMENT)


def batch_maker(name: str, samples: int):
    """make(out): one batch of the workload written into ``out``, as ringfeed's workers would."""
    import numba

    from ringfeed.server.augment import Pipeline
    from ringfeed.server.augment.rng import sample_keys

    numba.set_num_threads(1)
    features, _, augment = workload(name, samples)
    rng = np.random.default_rng(SEED)
    if name == "gather":
        def make(out):
            np.take(features, rng.integers(0, len(features), BATCH), axis=0, out=out.view(np.float32).reshape(
                BATCH, *features.shape[1:]))
        return make
    pipe = Pipeline(augment, IMAGE, np.uint8, compiled=True)

    def make(out):
        keys = sample_keys(SEED, 0, int(rng.integers(1 << 30)), BATCH)
        pipe.run(features, rng.integers(0, len(features), BATCH), keys,
                 out.view(np.float32).reshape(BATCH, *pipe.out_shape))
    return make


def raw_sender(endpoint: str, nbytes: int, buffers: int, work: tuple | None, stop) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 8)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 500)
    sock.bind(endpoint)
    payloads = [np.ones(nbytes, np.uint8) for _ in range(buffers)]
    trackers = [None] * buffers
    make = batch_maker(*work) if work else None
    sent, made = 0, -1
    while not stop.is_set():
        k = sent % buffers
        if make is not None and made != sent:
            if trackers[k] is not None and not trackers[k].done:  # ZeroMQ may still be sending it
                try:
                    trackers[k].wait(0.5)
                except zmq.NotDone:
                    continue
            make(payloads[k])
            made = sent
        try:
            trackers[k] = sock.send(payloads[k], copy=False, track=make is not None)
        except zmq.Again:
            continue
        sent += 1
    sock.close(0)


class RawZmq:
    name = "raw pyzmq tcp"
    servers = 1

    @staticmethod
    def named(buffers: int, makes_batches: bool = False) -> str:
        if makes_batches:
            return f"{RawZmq.name}, sender makes each batch (1 core)"
        return RawZmq.name if buffers == 1 else f"{RawZmq.name}, {buffers} buffers in turn"

    def __init__(self, nbytes: int, buffers: int = 1, work: tuple | None = None):
        import zmq

        self.name = self.named(buffers, work is not None)
        self.nbytes, self.batch_bytes = nbytes, nbytes
        endpoint = f"tcp://127.0.0.1:{benchlib.free_port()}"
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=raw_sender, args=(endpoint, nbytes, buffers, work, self._stop),
                                 daemon=True)
        self._proc.start()
        self._sock = zmq.Context.instance().socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 8)
        self._sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
        self._sock.connect(endpoint)

    def pull(self) -> None:
        frame = self._sock.recv(copy=False)
        np.frombuffer(frame, np.uint8)

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
        self._sock.close(0)


class RingfeedRoute:
    def __init__(self, name: str, endpoints, transport: str, batch_bytes: int):
        from ringfeed import open_feed

        self.name, self.batch_bytes = name, batch_bytes
        self.servers = 1 if isinstance(endpoints, str) else len(endpoints)
        self.feed = open_feed(endpoints, transport=transport, timeout_s=30)
        self._gen = self.feed.generator()

    def pull(self) -> None:
        next(self._gen)

    def stop(self) -> None:
        self.feed.close()


def parse_args() -> argparse.Namespace:
    """The arguments, with ``seconds``, ``warmup`` and ``samples`` filled in for a full or quick run."""
    p = benchlib.parser(__doc__.split("\n\n")[0], rounds=5, quick_rounds=2)
    p.add_argument("--seconds", type=float, help="timed seconds per contender per round (default 4, 0.5 quick)")
    p.add_argument("--workload", choices=("augment", "gather"), default="augment",
                   help="augment: the standard crop/flip/normalize workload; gather: float32 samples already "
                        "56x56x3 and no augmentation, so workers only gather and the transport sets the rate")
    args = benchlib.parse(p)
    args.seconds = args.seconds or (0.5 if args.quick else 4.0)
    # Untimed pulls: past what a feed's prefetch (16 from each of its servers) or raw pyzmq's
    # queues (8 + 8) hold.
    args.warmup = 3 if args.quick else 24
    args.samples = 2048 if args.quick else 20000
    return args


def start_routes(stack: ExitStack, args: argparse.Namespace, features, labels, augment, batch_bytes: int) -> list:
    """The raw pyzmq senders and the ringfeed routes, each stopped by ``stack``."""
    from ringfeed.server import Config, Service

    def service(tag: str, workers: int, tcp: bool, **options):
        endpoint = f"tcp://127.0.0.1:{benchlib.free_port()}" if tcp else None
        config = Config(batch_size=BATCH, workers=workers, seed=SEED, augment=augment, endpoint=endpoint,
                        name=benchlib.service_name("remote", tag), **options)
        return stack.enter_context(Service(config, features=features, labels=labels))

    log("starting services: two on tcp with 2 workers (one with plain stores), three on tcp with 1 worker each")
    single = service("single", 2, tcp=True)
    plain = service("plain", 2, tcp=True, streaming_stores=False)
    trio = [service(f"trio{k}", 1, tcp=True) for k in range(3)]
    making = RawZmq(batch_bytes, RING_BUFFERS, (args.workload, args.samples))
    routes = [RawZmq(batch_bytes), RawZmq(batch_bytes, RING_BUFFERS), making,
              RingfeedRoute("ringfeed tcp frames", single.endpoint, "frames", batch_bytes),
              RingfeedRoute("ringfeed tcp frames, plain stores", plain.endpoint, "frames", batch_bytes),
              RingfeedRoute("ringfeed shm (same server)", single.endpoint, "shm", batch_bytes),
              RingfeedRoute("ringfeed 3 servers fan-in", [s.endpoint for s in trio], "frames", batch_bytes)]
    for route in routes:
        stack.callback(route.stop)
    return routes


def run_rounds(routes: list, rounds: int, seconds: float, warmup: int) -> dict[str, list[float]]:
    """Each round times every route once, the order rotated by one each round: name -> MB/s per round."""
    measured = {route.name: [] for route in routes}
    for r in range(rounds):
        shift = r % len(routes)
        for route in routes[shift:] + routes[:shift]:
            calls, elapsed = benchlib.timed(route.pull, seconds, warmup * route.servers)
            mb_s = calls * route.batch_bytes / elapsed / 1e6
            measured[route.name].append(mb_s)
            log(f"[round {r + 1}/{rounds}] {route.name:<48} {mb_s:>8,.0f} MB/s")
    return measured


def summarize(rounds: dict[str, list[float]], batch_bytes: int) -> list[dict]:
    raw, ring, made = (benchlib.median(rounds[name]) for name in (
        RawZmq.named(1), RawZmq.named(RING_BUFFERS), RawZmq.named(RING_BUFFERS, makes_batches=True)))
    rows = []
    for name, values in rounds.items():
        mb_s = benchlib.median(values)
        rows.append({"name": name, "rounds_mb_per_s": values, "median_mb_per_s": mb_s,
                     "median_samples_per_s": None if name.startswith(RawZmq.name) else mb_s * 1e6 / batch_bytes * BATCH,
                     "ratio_to_raw_pyzmq": benchlib.ratio(mb_s, raw),
                     "ratio_to_raw_ring_buffers": benchlib.ratio(mb_s, ring),
                     "ratio_to_raw_sender_making_batches": benchlib.ratio(mb_s, made)})
    return rows


def main() -> None:
    args = parse_args()
    features, labels, augment = workload(args.workload, args.samples)
    args.samples = len(features)
    batch_bytes = BATCH * CROP[0] * CROP[1] * IMAGE[2] * 4
    result = benchlib.header("remote", args, workload=args.workload, samples=args.samples, batch_size=BATCH,
                             batch_bytes=batch_bytes, augment=augment, seconds_per_round=args.seconds,
                             targets={"tcp_vs_raw": TARGET_RATIO})
    with ExitStack() as stack:
        routes = start_routes(stack, args, features, labels, augment, batch_bytes)
        rounds = run_rounds(routes, args.rounds, args.seconds, args.warmup)
    rows = summarize(rounds, batch_bytes)
    result["contenders"] = rows
    benchlib.write_json(args.out / f"remote-{args.workload}.json", result)
    print(f"{'contender':<48}{'MB/s':>10}{'vs raw':>9}{'vs raw ring':>13}{'vs raw making':>15}")
    for row in rows:
        print(f"{row['name']:<48}{row['median_mb_per_s']:>10,.0f}{row['ratio_to_raw_pyzmq']:>9.2f}"
              f"{row['ratio_to_raw_ring_buffers']:>13.2f}{row['ratio_to_raw_sender_making_batches']:>15.2f}")


if __name__ == "__main__":
    main()
