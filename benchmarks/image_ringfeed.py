"""images.py's ringfeed side: the in-process limit (ringfeed's ``BatchMaker`` in one process per
core), the ringfeed services and their feeds, and what DCT downscaling saves of the decode time.
"""

from __future__ import annotations

import itertools
import math
import time
from contextlib import ExitStack

import numpy as np

import benchlib
from benchlib import SEED, log
from image_contenders import AUGMENT, SIZE, Contender, check_batch, plural


# The in-process limit -------------------------------------------------------------------

def _limit_process(conn, data: str, augment: list, batch_size: int, index: int, count: int) -> None:
    """One core of the limit: ringfeed's BatchMaker on ``data`` in this process, making batches
    index, index + count, ... into one buffer, timed on the parent's word."""
    import numba

    numba.set_num_threads(1)
    from ringfeed.server import Config
    from ringfeed.server.batches import BatchMaker
    from ringfeed.server.service import prepare_source

    config, ref, _ = prepare_source(Config(data=data, batch_size=batch_size, workers=1, seed=SEED, augment=augment),
                                    f"imglimit{index}")
    maker = BatchMaker(config, ref)
    out = maker.empty_batch()
    x = out[config.structure.inputs]
    steps = maker.sampler.steps_per_epoch
    batch = itertools.count(index, count)

    def make():
        epoch, step = divmod(next(batch), steps)
        maker.make(epoch, step, out)

    make()
    conn.send(benchlib.shape_dtype(x))
    while (order := conn.recv()) is not None:
        conn.send(benchlib.timed(make, *order))


class InProcessLimit(Contender):
    """ringfeed's decode and kernels (``BatchMaker.make``) on the packed file, one process per
    core, each writing its batches into one buffer: nothing delivered. A round times all of them
    at once; the rate is their sum."""

    group = "limit"

    def __init__(self, data: str, dtype: str, batch: int, cores: int):
        suffix = "" if dtype == "float32" else "-uint8"
        super().__init__(f"in-process-limit{suffix}",
                         f"in-process limit, {plural(cores, 'process', 'es')}, packed, {dtype}", dtype, batch, cores)
        self.data = data

    def launch(self) -> None:
        """Start the processes; ``start`` waits for them (so they can start beside other things)."""
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # a fork would inherit this process's threads (TensorFlow's)
        self.conns, self.procs = [], []
        for k in range(self.workers):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_limit_process, daemon=True, name=f"image-limit-{k}",
                               args=(theirs, self.data, AUGMENT[self.dtype], self.batch, k, self.workers))
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)

    def start(self, warmup: int) -> None:
        if not hasattr(self, "conns"):
            self.launch()
        for conn in self.conns:
            shape, dtype = conn.recv()
            check_batch(self.name, np.empty(shape, dtype), self.dtype, self.batch)
            self.delivered = {"x": [list(shape), dtype]}
        self.measure(0.0, warmup)

    def measure(self, seconds: float, warmup: int) -> dict:
        for conn in self.conns:
            conn.send((seconds, warmup))
        timed = [conn.recv() for conn in self.conns]
        return {"images_per_s": sum(b * self.batch / s for b, s in timed), "batches": sum(b for b, _ in timed),
                "seconds": max(s for _, s in timed)}

    def stop(self) -> None:
        for conn in getattr(self, "conns", []):
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in getattr(self, "procs", []):
            proc.join(10)
            if proc.is_alive():
                proc.kill()


# ringfeed ----------------------------------------------------------------------------------

class Ringfeed(Contender):
    """A feed of its own service (one worker per core), open for the whole run."""

    group = "ringfeed"

    def __init__(self, endpoint: str, source: str, dtype: str, batch: int, workers: int, prefetch: int):
        suffix = "" if dtype == "float32" else "-uint8"
        super().__init__(f"ringfeed-{source}{suffix}",
                         f"ringfeed generator(), {plural(workers, 'worker')}, {source}, {dtype}", dtype, batch,
                         workers)
        self.endpoint, self.prefetch, self.source = endpoint, prefetch, source

    def start(self, warmup: int) -> None:
        from ringfeed import Feed

        self.feed = Feed(self.endpoint, prefetch=self.prefetch)
        self.it = self.feed.generator()
        super().start(warmup)

    def pull(self):
        return next(self.it)[0]

    def stop(self) -> None:
        self.it = None
        if hasattr(self, "feed"):
            self.feed.close()


def ringfeed_services(stack: ExitStack, wanted: list[tuple[str, str, str]], batch: int, workers: int,
                      slots: int) -> list[str]:
    """A service of its own for each (source, data, dtype), batches of ``batch``, started side by side
    and stopped side by side (each waits for its server to exit); their endpoints, in order. The
    threads that start them live until they are stopped: a server dies with the thread that started
    it (PR_SET_PDEATHSIG follows the creating thread, not the process)."""
    from concurrent.futures import ThreadPoolExecutor

    from ringfeed.server import Config, Service

    services = []
    for source, data, dtype in wanted:
        log(f"starting a ringfeed service with {plural(workers, 'worker')} on the {source} ({dtype})")
        services.append(Service(Config(data=data, batch_size=batch, workers=workers, slots=slots, seed=SEED,
                                       augment=AUGMENT[dtype],
                                       name=benchlib.service_name("images", f"{source}-{dtype}"))))

    pool = ThreadPoolExecutor(len(services), thread_name_prefix="ringfeed-service")

    def stop_all():
        list(pool.map(lambda s: s.stop(), services))
        pool.shutdown()

    stack.callback(stop_all)
    return [s.endpoint for s in pool.map(lambda s: s.start(), services)]


# -- DCT downscaling -------------------------------------------------------------------------

def dct_saving(pack_path: str, samples: int, rounds: int) -> dict:
    """Decode time, one thread, of the same sampled JPEGs at full size and with the ``min_size`` that
    the RandomResizedCrop boxes drawn for them allow (as ringfeed's image field decodes): the share
    of decode time DCT downscaling saves. Thread CPU time, median over interleaved rounds."""
    from ringfeed.server.augment.ops import Frame
    from ringfeed.server.augment.rng import sample_keys
    from ringfeed.server.images.decode import Decoder, dct_factor, read_header
    from ringfeed.server.images.ops import RandomResizedCrop
    from ringfeed.server.packfile import PackedFile

    with PackedFile(pack_path) as pack:
        records = pack.records("image")
        idx = np.random.default_rng([SEED, 2]).choice(len(records), samples, replace=len(records) < samples)
        encoded = [bytes(records.get(int(i))) for i in idx]
    sizes = np.array([read_header(data) for data in encoded])
    op = RandomResizedCrop("random_resized_crop", {"size": SIZE}, Frame(0, 0, 3, True), 0)
    _, _, bh, bw = op.boxes(sizes[:, 0], sizes[:, 1], sample_keys(SEED, 0, 0, samples))
    min_sizes = [(math.ceil(h * SIZE / b_h), math.ceil(w * SIZE / b_w))
                 for (h, w), b_h, b_w in zip(sizes, bh, bw)]
    factors = [dct_factor(int(h), int(w), m) for (h, w), m in zip(sizes, min_sizes)]
    decoder = Decoder(3)
    for data, m in zip(encoded, min_sizes):  # warm: the buffer grows to its largest once
        decoder.decode(data)
        decoder.decode(data, min_size=m)
    full, scaled = [], []
    for r in range(rounds):
        for kind in (("full", "scaled") if r % 2 == 0 else ("scaled", "full")):
            start = time.thread_time()
            if kind == "full":
                for data in encoded:
                    decoder.decode(data)
                full.append((time.thread_time() - start) / samples * 1e6)
            else:
                for data, m in zip(encoded, min_sizes):
                    decoder.decode(data, min_size=m)
                scaled.append((time.thread_time() - start) / samples * 1e6)
    full_us, scaled_us = benchlib.median(full), benchlib.median(scaled)
    return {"samples": samples, "rounds": rounds, "full_us_per_image": full_us, "scaled_us_per_image": scaled_us,
            "share_saved": 1 - scaled_us / full_us,
            "median_round_share_saved": benchlib.median(1 - s / f for f, s in zip(full, scaled)),
            "factors": {str(f): factors.count(f) for f in (1, 2, 4, 8)},
            "rounds_full_us": full, "rounds_scaled_us": scaled}
