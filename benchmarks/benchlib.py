"""What the benchmark scripts share: the workload, timing, machine facts and output.

Imports nothing heavier than numpy at module level: ringfeed's server and its
workers are *spawned*, so every child re-imports the script that started it,
and this module with it. TensorFlow, Keras and PyTorch are imported inside
the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

# The Benchmarks issue's workload: 64x64x3 uint8 images, random 56x56 crop,
# random horizontal flip, then (x/255 - mean)/std to float32, batch 256.
IMAGE = (64, 64, 3)
CROP = (56, 56)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
AUGMENT = [{"op": "random_crop", "size": list(CROP)}, {"op": "flip_lr"},
           {"op": "normalize", "mean": MEAN.tolist(), "std": STD.tolist()}]
BATCH = 256
CLASSES = 10
SEED = 0
LOADER_TIMEOUT_S = 60  # a DataLoader worker that hangs fails the run rather than stalling it
STARTED = time.monotonic()  # the script's start: its JSON records how long the whole run took


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- arguments and names ------------------------------------------------------

def add_output_options(p: argparse.ArgumentParser, out_help: str = "folder for the results") -> None:
    """``--out`` and ``--write-results``: only a deliberate full run updates the committed results."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help=f"{out_help} (default: a new temporary folder, printed; "
                       f"{RESULTS.relative_to(REPO)}/ with --write-results)")
    where.add_argument("--write-results", action="store_true",
                       help=f"a deliberate full run: write into {RESULTS.relative_to(REPO)}/, the results "
                       "benchmarks/RESULTS.md reports (refused with --quick)")


def output_folder(p: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """Where this run writes: ``--out``, ``RESULTS`` with ``--write-results``, else a temporary
    folder (said on stderr), so smoke and ad-hoc runs never overwrite the committed results."""
    if args.write_results and getattr(args, "quick", False):
        p.error("--quick --write-results: quick results are not committed; drop --quick for a full run, "
                "or give --out DIR")
    if args.out is not None:
        folder = args.out
    elif args.write_results:
        folder = RESULTS
    else:
        folder = Path(tempfile.mkdtemp(prefix=f"ringfeed-{Path(sys.argv[0]).stem}-"))
        log(f"writing the results to {folder} (--write-results updates {RESULTS.relative_to(REPO)}/)")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def parser(description: str, rounds: int, quick_rounds: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run in under a minute: smaller data, {quick_rounds} short rounds")
    p.add_argument("--rounds", type=int, help=f"interleaved rounds (default {rounds}, {quick_rounds} with --quick)")
    add_output_options(p)
    p.set_defaults(default_rounds=rounds, default_quick_rounds=quick_rounds)
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments, with ``rounds`` filled in and ``out`` the folder to write (``output_folder``)."""
    args = p.parse_args()
    if args.rounds is None:
        args.rounds = args.default_quick_rounds if args.quick else args.default_rounds
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.out = output_folder(p, args)
    return args


def free_port() -> int:
    """A loopback TCP port that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_counts() -> list[int]:
    """1, 2, 4, ... up to the number of cores, and the number of cores itself."""
    cores = os.cpu_count() or 1
    counts, n = {cores}, 1
    while n < cores:
        counts.add(n)
        n *= 2
    return sorted(counts)


def service_name(bench: str, tag: str) -> str:
    """Unique per process, so concurrent benchmark runs and tests never share a service."""
    return f"bench-{bench}-{os.getpid()}-{tag}"


def ringfeed_services(stack, bench: str, kinds, features, labels, counts=None, fields=None, **options):
    """A service of its own for each kind of ringfeed contender and worker count (an idle
    feed holds slots of its service, so feeds never share one): yields (kind, workers, endpoint).
    ``fields``: the dataset's named fields, in place of ``features`` and ``labels``. ``options``
    are further ``Config`` options (``augment`` replaces the standard ``AUGMENT``)."""
    from ringfeed.server import Config, Service

    options = {"augment": AUGMENT, **options}
    data = {"fields": fields} if fields is not None else {"features": features, "labels": labels}
    for w in counts or worker_counts():
        for kind in kinds:
            log(f"starting a ringfeed service with {w} worker(s) for {kind.__name__}")
            config = Config(batch_size=BATCH, workers=w, seed=SEED,
                            name=service_name(bench, f"{kind.__name__}-w{w}"), **options)
            yield kind, w, stack.enter_context(Service(config, **data)).endpoint


def ringfeed_contender(route: str, workers: int) -> tuple[str, str]:
    """(name, label) of a ringfeed contender; ``route`` is "generator" or "tf-dataset"."""
    call = "generator()" if route == "generator" else "as_tf_dataset()"
    return f"ringfeed-{route}-w{workers}", f"ringfeed {call}, {workers} worker{'s' * (workers > 1)}"


# -- the workload -------------------------------------------------------------

def make_images(n: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, *IMAGE), dtype=np.uint8),
            rng.integers(0, CLASSES, n, dtype=np.int64))


def augment_sample(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One sample, the way a hand-written Keras generator does it: numpy, in Python."""
    top = rng.integers(0, image.shape[0] - CROP[0] + 1)
    left = rng.integers(0, image.shape[1] - CROP[1] + 1)
    crop = image[top:top + CROP[0], left:left + CROP[1]]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return (crop.astype(np.float32) / np.float32(255.0) - MEAN) / STD


META = 16  # the multi-field workload's second input: a float32 vector per sample


def make_fields(features, labels, seed: int = SEED) -> dict[str, np.ndarray]:
    """The multi-field workload: the images and labels, a float32 (16,) ``meta`` vector and a
    float32 ``weight`` per sample."""
    rng = np.random.default_rng([seed, 1])
    return {"features": features, "meta": rng.random((len(features), META), dtype=np.float32),
            "labels": labels, "weight": rng.random(len(features), dtype=np.float32)}


def classic_batch(features, labels, rng: np.random.Generator, batch_size: int = BATCH):
    """Random indices, then one sample at a time (the Keras ``fit_generator`` recipe)."""
    idx = rng.integers(0, len(features), batch_size)
    x = np.empty((batch_size, *CROP, IMAGE[2]), np.float32)
    for k, i in enumerate(idx):
        x[k] = augment_sample(features[i], rng)
    return x, labels[idx]


def classic_generator(features, labels, seed: int = SEED, batch_size: int = BATCH):
    rng = np.random.default_rng(seed)
    while True:
        yield classic_batch(features, labels, rng, batch_size)


def tf_pipeline(features, labels, seed: int = SEED, batch_size: int = BATCH):
    """from_tensor_slices -> shuffle -> map(AUTOTUNE) -> batch -> prefetch, as the tf.data guide says.

    ``repeat`` follows the full-dataset shuffle so the stream never ends."""
    import tensorflow as tf

    mean, std = tf.constant(MEAN), tf.constant(STD)

    def augment(image, label):
        image = tf.image.random_crop(image, (*CROP, IMAGE[2]))
        image = tf.image.random_flip_left_right(image)
        return (tf.cast(image, tf.float32) / 255.0 - mean) / std, label

    tf.random.set_seed(seed)
    ds = tf.data.Dataset.from_tensor_slices((features, labels)).shuffle(len(features), seed=seed).repeat()
    return ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size, drop_remainder=True) \
             .prefetch(tf.data.AUTOTUNE)


# -- measuring ----------------------------------------------------------------

def timed(pull, seconds: float, warmup: int) -> tuple[int, float]:
    """Call ``pull`` ``warmup`` times untimed, then until ``seconds`` have passed; (calls, seconds)."""
    for _ in range(warmup):
        pull()
    calls, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        pull()
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            return calls, now - start


class IteratorPerRound:
    """For a contender whose ``start`` builds a tf.data ``dataset``: a fresh iterator each round.
    Left running between rounds, its AUTOTUNE map and prefetch would keep filling buffers in this
    process's threads, on the CPU of whichever loader is timed next."""

    @contextmanager
    def round(self):
        self.it = iter(self.dataset)
        try:
            yield self.pull
        finally:
            self.it = None

    def pull(self):
        return next(self.it)[0]


def torch_loader(dataset, workers: int, worker_init_fn, batch_size: int | None, sampler=None):
    """A PyTorch DataLoader as every torch contender runs it: forked workers, each set up by
    ``worker_init_fn``, and bounded waits; ``sampler`` by default an endless random one."""
    from torch.utils.data import DataLoader, RandomSampler

    if sampler is None:
        sampler = RandomSampler(dataset, replacement=True, num_samples=1 << 62)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, sampler=sampler,
                      worker_init_fn=worker_init_fn, multiprocessing_context="fork", timeout=LOADER_TIMEOUT_S)


def shape_dtype(a) -> tuple[tuple, str]:
    """(shape, dtype name) of a numpy array or a TensorFlow or PyTorch tensor."""
    return tuple(a.shape), getattr(a.dtype, "name", None) or str(a.dtype).rsplit(".", 1)[-1]


def torch_missing() -> str | None:
    """Why the PyTorch DataLoader contenders cannot run here, or None."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return f"torch is not importable ({exc}); pip install torch to include the DataLoader contenders"
    return None


def start_all(stack, contenders, warmup: int) -> None:
    """Start (build and warm, untimed) each contender in turn, its ``stop`` on ``stack``."""
    for c in contenders:
        log(f"starting {c.label}")
        stack.callback(c.stop)
        c.start(warmup)


def median(values) -> float:
    return float(statistics.median(values))


def ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value and reference else None


def same_run_ratios(mine: list[float], theirs: list[float]) -> tuple[float | None, float]:
    """Two contenders timed in the same rounds: the ratio of their medians, and the median of
    each round's own ratio."""
    return ratio(median(mine), median(theirs)), median(a / b for a, b in zip(mine, theirs))


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process, from /proc (other processes' included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def _tree_cpu_s(pid: int) -> float:
    try:
        return process_cpu_s(pid) + sum(_tree_cpu_s(child) for child in child_pids(pid))
    except (FileNotFoundError, ProcessLookupError):
        return 0.0  # exited between listing and reading


def cpu_snapshot() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its descendants)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait; steal counts as busy: another VM had the core
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), _tree_cpu_s(os.getpid())


def other_load(before: tuple[float, float], after: tuple[float, float], seconds: float) -> float:
    """Share of the machine's cores that processes outside this benchmark kept busy: the machine
    may be shared, and a round measured while others ran says less."""
    busy, mine = after[0] - before[0], after[1] - before[1]
    return max(0.0, (busy - mine) / (seconds * (os.cpu_count() or 1)))


class OtherLoad:
    """``with OtherLoad() as load: ...`` then ``load.share``: ``other_load`` over the block."""

    def __enter__(self) -> OtherLoad:
        self._start, self._cpu = time.perf_counter(), cpu_snapshot()
        return self

    def __exit__(self, *exc) -> None:
        self.share = other_load(self._cpu, cpu_snapshot(), time.perf_counter() - self._start)


# -- machine, versions, output ------------------------------------------------

def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    ram_kib = 0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            ram_kib = int(line.split()[1])
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram_kib / 2**20, 1), "gpu": gpu_name(),
            "os": platform.platform(), "load_average": list(os.getloadavg())}


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name, from ``nvidia-smi``; None where there is none."""
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = listed.stdout.strip().splitlines() if listed.returncode == 0 else []
    return names[0] if names else None


def _version(*distributions: str) -> str | None:
    for dist in distributions:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    return {"python": platform.python_version(), "numpy": _version("numpy"), "numba": _version("numba"),
            "tensorflow": _version("tensorflow", "tensorflow-cpu"), "keras": _version("keras"),
            "pyzmq": _version("pyzmq"), "torch": _version("torch"), "ringfeed": _version("ringfeed")}


def ringfeed_source() -> dict:
    """Which ringfeed code ran: the imported package's folder and its git commit, dirty or not."""
    import ringfeed.server

    folder = Path(ringfeed.server.__file__).resolve().parent.parent
    info = {"path": str(folder), "commit": None, "dirty": None}
    try:
        git = ["git", "-C", str(folder)]
        info["commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
        info["dirty"] = bool(subprocess.run(git + ["status", "--porcelain", "--", "loader_server", "client"],
                                            capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass  # not a git checkout: path alone says where the code came from
    return info


def header(bench: str, args: argparse.Namespace, **settings) -> dict:
    return {"benchmark": bench, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]), "quick": args.quick,
            "rounds": args.rounds, "settings": settings, "machine": machine_info(), "versions": versions(),
            "ringfeed_source": ringfeed_source()}


def print_comparisons(comparisons: list[dict]) -> None:
    """One line per comparison row (``what``, ``ratio``, ``median_round_ratio``, ``target``)."""
    for c in comparisons:
        shown = "not measured" if c["ratio"] is None else \
            f"{c['ratio']:.2f}x (per round {c['median_round_ratio']:.2f}x)"
        target = "" if c["target"] is None else f", target >= {c['target']:g}x"
        print(f"{c['what']}: {shown}{target}")


def write_json(path: Path, result: dict) -> None:
    result["machine"]["load_average_end"] = list(os.getloadavg())
    result["duration_s"] = round(time.monotonic() - STARTED, 1)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    log(f"wrote {path}")
