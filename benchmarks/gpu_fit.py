"""Keras ``model.fit`` on a GPU (Keras 3 on the torch backend): does the input keep the GPU fed?

The same convnet and workload as ``fit.py``. On the torch backend Keras pulls a
generator in the training loop itself, with no prefetching thread, so every
wait for a batch is a step the GPU sits idle: the input stall is the time
spent inside the input's ``next()`` over the timed window (for ringfeed, the
feed's own wait on the server).

Inputs:

- ceiling: one batch that already lives on the device, yielded again and
  again. The model alone, with data costing nothing.
- host-batch: one numpy batch yielded again and again. Keras on the torch
  backend copies a numpy input on the host (``np.array``), then to the device,
  every step: the ceiling of numpy inputs.
- host-batch-pinned: one page-locked torch batch, sent to the device each step.
- classic-generator: the Keras ``fit_generator`` recipe, per-sample numpy.
- torch-dataloader: the PyTorch DataLoader set up at its best for this work
  (a batch-level dataset running ringfeed's numba kernel, ``--workers``
  persistent forked workers, ``pin_memory`` on a GPU), read through a
  generator as every other input is.
- ringfeed with 2 and with ``--workers`` workers: ``generator()`` (numpy,
  which Keras copies once more on the host), ``torch_generator()`` (tensors
  over the ring, sent to the device as they are) and, on a GPU, the latter
  with ``Feed(pin_memory=True)``, which page-locks the ring so the copy engine
  reads each slot directly. host-batch-pinned is the ceiling of the last.

Each input gets its own freshly initialised model (same seed), traced by an
untimed fit; then interleaved rounds, timed from the end of step ``--warmup``
to the end of the last step, as in ``fit.py``. Without CUDA it runs on the
CPU, and says so in its output (the test suite runs ``--quick`` that way).
It sets ``KERAS_BACKEND=torch`` itself; PyTorch must be installed.

    .venv/bin/python benchmarks/gpu_fit.py [--quick] [--workers N] [--ringfeed-workers N ...] [--out DIR | --write-results]
"""

from __future__ import annotations

import itertools
import os
import time
from contextlib import ExitStack

os.environ["KERAS_BACKEND"] = "torch"  # before anything imports Keras

import benchlib  # noqa: E402
import fit  # noqa: E402
from benchlib import AUGMENT, BATCH, SEED, log  # noqa: E402


class RepeatedBatch(fit.Input):
    """The model alone: one batch yielded again and again, kept where its name says."""

    LABELS = {"ceiling": "model alone, one batch already on the device",
              "host-batch": "model alone, one numpy batch copied to the device each step",
              "host-batch-pinned": "model alone, one pinned batch copied to the device each step"}

    def __init__(self, name: str, features, labels, device: str):
        import numpy as np
        import torch

        super().__init__(name, self.LABELS[name])
        self.batch = benchlib.classic_batch(features, labels, np.random.default_rng(SEED))
        if name == "ceiling":
            self.batch = tuple(torch.as_tensor(a, device=device) for a in self.batch)
        elif name == "host-batch-pinned":
            self.batch = tuple(torch.as_tensor(a).pin_memory() for a in self.batch)

    def data(self, round_: int):
        return fit.repeat(self.batch)


class TorchDataLoader(fit.TimedReader):
    """One endless DataLoader for the whole run; forked before the parent touches CUDA."""

    def __init__(self, features, labels, workers: int, pin_memory: bool):
        from torch.utils.data import DataLoader

        from throughput_contenders import NumbaBatchDataset, _torch_worker_init

        super().__init__("torch-dataloader", f"PyTorch DataLoader, numba batches, {workers} workers"
                         + (", pin_memory" if pin_memory else ""), workers)
        loader = DataLoader(NumbaBatchDataset(features, labels), batch_size=None, sampler=itertools.count(),
                            num_workers=workers, pin_memory=pin_memory, persistent_workers=True,
                            worker_init_fn=_torch_worker_init, multiprocessing_context="fork",
                            timeout=benchlib.LOADER_TIMEOUT_S)
        self.batches = iter(loader)

    def data(self, round_: int):
        return self.timed(map(tuple, self.batches))  # the loader converts the pair to a list

    def stop(self) -> None:
        self.batches = None  # shuts the workers down


class RingfeedTorch(fit.RingfeedGenerator):
    """``feed.torch_generator()``: tensors over the ring, which Keras sends to the device as they are."""

    def __init__(self, endpoint: str, workers: int, pin_memory: bool = False):
        super().__init__(endpoint, workers, pin_memory=pin_memory)
        self.name = f"ringfeed-torch{'-pinned' * pin_memory}-w{workers}"
        self.label = (f"ringfeed torch_generator(){', pin_memory' * pin_memory}, "
                      f"{workers} worker{'s' * (workers > 1)}")

    def data(self, round_: int):
        return self.feed.torch_generator()


class RingfeedTorchPinned(RingfeedTorch):
    """A kind of its own, so that ``ringfeed_services`` starts it a service of its own."""

    def __init__(self, endpoint: str, workers: int):
        super().__init__(endpoint, workers, pin_memory=True)


def check_pinned(plain: str, pinned: str) -> dict:
    """The first batch of a pinned feed is the plain feed's, and torch sees its slot as pinned."""
    import numpy as np
    import torch

    from ringfeed import Feed

    with Feed(plain) as a, Feed(pinned, pin_memory=True) as b:
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        check = {"same_first_batch": bool(np.array_equal(xa, xb) and np.array_equal(ya, yb)),
                 "slot_is_pinned": bool(torch.from_numpy(xb).is_pinned())}
        del xa, ya, xb, yb
    if not all(check.values()):
        raise AssertionError(f"pin_memory check failed: {check}")
    return check


def copy_ms(x, copies: int = 50) -> dict:
    """Milliseconds per host-to-device copy of the batch ``x``, from pageable and from pinned memory."""
    import torch

    pageable = torch.from_numpy(x)
    device = torch.empty_like(pageable, device="cuda")
    times = {}
    for kind, source in (("pageable", pageable), ("pinned", pageable.pin_memory())):
        for _ in range(3):
            device.copy_(source)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(copies):
            device.copy_(source)
        torch.cuda.synchronize()
        times[kind] = (time.perf_counter() - start) / copies * 1e3
    return times


def accelerator() -> dict:
    import keras
    import torch

    cuda = torch.cuda.is_available()
    return {"keras_backend": keras.backend.backend(), "device": "cuda" if cuda else "cpu",
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch_cuda": torch.version.cuda}


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0], rounds=5, quick_rounds=2)
    p.add_argument("--steps", type=int, help="timed steps per fit (default 400, 15 quick)")
    p.add_argument("--warmup", type=int, help="untimed steps at the start of each fit (default 24, 3 quick)")
    p.add_argument("--samples", type=int, help="dataset size (default 20000, 2048 quick)")
    p.add_argument("--workers", type=int, help="workers of the DataLoader and the larger ringfeed service "
                                               "(default half the cores, at least 2)")
    p.add_argument("--ringfeed-workers", type=int, nargs="+",
                   help="worker counts of the ringfeed services (default 2 and --workers)")
    args = benchlib.parse(p)
    steps = args.steps or (15 if args.quick else 400)
    warmup = args.warmup or (3 if args.quick else 24)
    samples = args.samples or (2048 if args.quick else 20000)
    workers = args.workers or max(2, (os.cpu_count() or 1) // 2)

    import torch

    features, labels = benchlib.make_images(samples)
    with ExitStack() as stack:
        # Fork the DataLoader's workers before CUDA starts in this process.
        loader = TorchDataLoader(features, labels, workers, pin_memory=torch.cuda.is_available())
        stack.callback(loader.stop)
        info = accelerator()
        log(f"Keras {info['keras_backend']} backend on {info['gpu'] or 'the CPU: no CUDA device'}")
        result = benchlib.header("gpu_fit", args, samples=samples, batch_size=BATCH, steps=steps,
                                 warmup_steps=warmup, workers=workers, augment=AUGMENT,
                                 model="Conv2D(16, 3, strides=2, relu) -> GlobalAveragePooling2D -> Dense(10), adam",
                                 **info)
        cuda = info["device"] == "cuda"
        host = RepeatedBatch("host-batch", features, labels, info["device"])
        inputs: list[fit.Input] = [RepeatedBatch("ceiling", features, labels, info["device"]), host]
        inputs += [RepeatedBatch("host-batch-pinned", features, labels, info["device"])] if cuda else []
        inputs += [fit.Classic(features, labels), loader]
        # Page-locking needs CUDA: on the CPU there is nothing to pin for.
        kinds = (fit.RingfeedGenerator, RingfeedTorch) + ((RingfeedTorchPinned,) if cuda else ())
        endpoints, counts = {}, sorted(args.ringfeed_workers or {2, workers})
        for kind, w, endpoint in benchlib.ringfeed_services(stack, "gpu", kinds, features, labels, counts=counts):
            endpoints[kind, w] = endpoint
            inputs.append(kind(endpoint, w))
            stack.callback(inputs[-1].stop)
        if cuda:
            result["pin_memory_check"] = check_pinned(endpoints[fit.RingfeedGenerator, counts[-1]],
                                                      endpoints[RingfeedTorchPinned, counts[-1]])
            log(f"pin_memory check: {result['pin_memory_check']}")
            result["copy_ms_per_batch"] = copy_ms(host.batch[0])
            log(f"host-to-device copy of one batch, ms: {result['copy_ms_per_batch']}")
        fit.run_rounds(inputs, args.rounds, warmup, steps)

    rows = fit.summarize(inputs, {"ratio_to_ceiling": "ceiling", "ratio_to_host_batch": "host-batch",
                                  "ratio_to_torch_dataloader": "torch-dataloader"})
    result["inputs"] = rows
    benchlib.write_json(args.out / "gpu_fit.json", result)
    fit.print_table(rows, {"x ceiling": "ratio_to_ceiling", "per round": "round_ratio_to_ceiling",
                           "x host": "ratio_to_host_batch", "x torch": "ratio_to_torch_dataloader"})


if __name__ == "__main__":
    main()
