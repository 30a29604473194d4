"""Soak test: a consumer pulls batches as fast as it can while a ready worker is SIGKILLed on a schedule.

Workload: 20,480 synthetic 32x32x3 uint8 images whose labels are their sample
ids, random 28x28 crop, flip, normalize (to float32), batch 128, 2 workers.
A thread SIGKILLs a random ready worker every ``--kill-every-s`` seconds (the
server replaces it and recomputes its batch) while the main thread consumes
over shared memory. Another thread SIGSTOPs a ready worker every
``--stop-every-s`` and SIGCONTs it after half, then twice, ``task_timeout_s``
in turn (so a pause the broker waits out, and one whose deadline makes it kill
and replace the worker). Unless ``--tcp-rate 0``, the server listens on
loopback TCP and a second feed reads its own stream there as frames at
``--tcp-rate`` batches/s, checked the same way (slots that ZeroMQ still sends
from must not be reused).

Checked, for every batch delivered:

* ids: each epoch must deliver every sample id exactly once (duplicates,
  losses and ids outside the epoch are counted per epoch);
* order and labels: ``y`` must equal the labels of the sampler's ids for
  batch (epoch, index), so a batch delivered twice, skipped or out of order is
  caught at once;
* content: ``x`` is compared bit for bit with the batch recomputed in this
  process (``BatchMaker``, the same pure function of (seed, epoch, index)) for
  every ``--check-every``-th batch (default 1: all of them, ~0.2 ms a batch),
  and always for the batches just after a kill.

Every ``--sample-every-s`` seconds a row is printed (stdout) with batches,
epochs, kills, restarts, the server's and the workers' RSS (``VmRSS`` and
``RssAnon`` from /proc/<pid>/status), the consumer's own RSS, the server's
open fds and child processes, and the ring's slots. The server's log (one
warning per restart) goes to ``--server-log``, not the terminal.

    .venv/bin/python benchmarks/soak.py --minutes 10 [--kill-every-s 2.0] [--stop-every-s 60]
                                        [--tcp-rate 20] [--workers 2]
                                        [--out FILE.json | --write-results]

Exit status: 0 clean; 1 if any duplicate, loss, unexpected id or mismatching
batch was seen; 2 if the run failed otherwise (an exception in the consumer,
no batches, no kill when kills were asked for).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import benchlib
from benchlib import log

AUGMENT = [{"op": "random_crop", "size": [28, 28]}, {"op": "flip_lr"},
           {"op": "normalize", "mean": 0.5, "std": 0.25}]
MAX_EXAMPLES = 20  # mismatches / gaps recorded in detail


# -- /proc ----------------------------------------------------------------------

def proc_status(pid: int) -> dict | None:
    """VmRSS, RssAnon, RssShmem (KiB) and Threads of ``pid``; None if it is gone."""
    wanted = {"VmRSS", "RssAnon", "RssShmem", "Threads"}
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in wanted:
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return out


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, PermissionError):
        return None


def children(pid: int) -> list[int] | None:
    try:
        return benchlib.child_pids(pid)
    except (FileNotFoundError, ProcessLookupError):
        return None


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


# -- the checks -----------------------------------------------------------------

class Verifier:
    """Recomputes batches in this process and keeps the per-epoch id accounting."""

    def __init__(self, config, features: np.ndarray, labels: np.ndarray):
        from loader_server import shm
        from loader_server.batches import BatchMaker
        from loader_server.sources import publish

        self.segment = shm.segment_name(os.getpid(), secrets.token_hex(4), "data")
        self.maker = BatchMaker(config, publish({"features": features, "labels": labels}, self.segment))
        self.labels = labels
        self.n = len(labels)
        self.steps = self.maker.sampler.steps_per_epoch
        self.expected = self.maker.empty_batch()
        self.x = self.expected["features"]
        self.counts = np.zeros(self.n, np.int32)
        self.epoch_start = time.monotonic()
        self.epoch_batches = 0
        self.epoch_label_mismatches = 0
        self.epoch_x_mismatches = 0
        self.epoch_checked = 0
        self.epochs: list[list] = []  # rows of EPOCH_COLUMNS
        self.mismatches: list[dict] = []
        self.totals = {"batches": 0, "x_checked": 0, "x_mismatches": 0, "label_mismatches": 0,
                       "bad_ids": 0, "duplicates": 0, "losses": 0, "unexpected": 0}

    def close(self) -> None:
        try:
            os.unlink(f"/dev/shm/{self.segment}")
        except FileNotFoundError:
            pass

    def _record(self, kind: str, seq: int, epoch: int, index: int, **detail) -> None:
        if len(self.mismatches) < MAX_EXAMPLES:
            self.mismatches.append({"kind": kind, "seq": seq, "epoch": epoch, "index": index, **detail})

    def batch(self, seq: int, x: np.ndarray, y: np.ndarray, check_x: bool) -> None:
        epoch, index = divmod(seq, self.steps)
        self.totals["batches"] += 1
        self.epoch_batches += 1
        ids = np.asarray(y).reshape(len(y), -1)[:, 0].astype(np.int64)
        bad = (ids < 0) | (ids >= self.n)
        if bad.any():
            self.totals["bad_ids"] += int(bad.sum())
            self._record("id out of range", seq, epoch, index, ids=ids[bad][:8].tolist())
            ids = ids[~bad]
        np.add.at(self.counts, ids, 1)
        expected_y = self.labels[self.maker.sampler.indices(epoch, index)]
        if y.shape != expected_y.shape or not np.array_equal(y, expected_y):
            self.totals["label_mismatches"] += 1
            self.epoch_label_mismatches += 1
            self._record("labels", seq, epoch, index, got=np.asarray(y).ravel()[:8].tolist(),
                         expected=expected_y.ravel()[:8].tolist())
        if check_x:
            self.maker.make(epoch, index, self.expected)
            self.totals["x_checked"] += 1
            self.epoch_checked += 1
            same = (x.shape == self.x.shape and x.dtype == self.x.dtype
                    and np.array_equal(np.ascontiguousarray(x).reshape(-1).view(np.uint8),
                                       self.x.reshape(-1).view(np.uint8)))
            if not same:
                self.totals["x_mismatches"] += 1
                self.epoch_x_mismatches += 1
                detail = {"shape": list(x.shape), "dtype": str(x.dtype)}
                if x.shape == self.x.shape:
                    diff = np.abs(x.astype(np.float64) - self.x.astype(np.float64))
                    detail.update(max_abs_diff=float(np.nanmax(diff)),
                                  samples_differing=int((diff.reshape(len(x), -1).max(axis=1) > 0).sum()))
                self._record("x", seq, epoch, index, **detail)
        if index == self.steps - 1:
            self.end_epoch(epoch, complete=True)

    def end_epoch(self, epoch: int, complete: bool) -> None:
        if self.epoch_batches == 0:
            return
        sampler = self.maker.sampler
        expected = np.zeros(self.n, bool)
        last = self.steps if complete else self.epoch_batches
        for index in range(last):
            expected[np.asarray(self.labels[sampler.indices(epoch, index)]).reshape(-1)] = True
        duplicates = int(np.maximum(self.counts - 1, 0).sum())
        losses = int((expected & (self.counts == 0)).sum())
        unexpected = int(((~expected) & (self.counts > 0)).sum())
        for key, value in (("duplicates", duplicates), ("losses", losses), ("unexpected", unexpected)):
            self.totals[key] += value
        self.epochs.append([epoch, complete, self.epoch_batches, int(self.counts.sum()), duplicates, losses,
                            unexpected, self.epoch_label_mismatches, self.epoch_checked, self.epoch_x_mismatches,
                            round(time.monotonic() - self.epoch_start, 3)])
        self.counts[:] = 0
        self.epoch_batches = self.epoch_label_mismatches = self.epoch_x_mismatches = self.epoch_checked = 0
        self.epoch_start = time.monotonic()

    @property
    def complete_epochs(self) -> int:
        return sum(1 for row in self.epochs if row[1])

    def failures(self) -> int:
        t = self.totals
        return (t["duplicates"] + t["losses"] + t["unexpected"] + t["bad_ids"] + t["label_mismatches"]
                + t["x_mismatches"])


EPOCH_COLUMNS = ["epoch", "complete", "batches", "ids_delivered", "duplicates", "losses", "unexpected",
                 "label_mismatches", "x_checked", "x_mismatches", "seconds"]


# -- the threads ----------------------------------------------------------------

class Shared:
    """Counters the threads read and write (single writers; the GIL is enough)."""

    def __init__(self):
        self.batches = 0
        self.epochs = 0
        self.kills: list[list] = []  # [t_s, pid]
        self.stops: list[list] = []  # [t_s, pid, held_s]
        self.kill_attempts_without_ready = 0
        self.kill_errors: list[str] = []
        self.restarts = None
        self.stop = threading.Event()


def ready_workers(svc, shared: Shared) -> list[int]:
    """Pids of the workers the server reports ready; only ever the server's own children."""
    from client.status import query_status

    try:
        status = query_status(svc.endpoint)
    except Exception as exc:  # a status error must not end the soak; record it
        shared.kill_errors.append(f"status: {type(exc).__name__}: {exc}")
        return []
    ready = [pid for pid in (status or {}).get("workers_ready", []) if pid]
    return [pid for pid in ready if parent_pid(pid) == svc.pid]


def killer(svc, shared: Shared, every_s: float, seed: int, t0: float) -> None:
    """Every ``every_s``: SIGKILL one random worker that the server reports ready."""
    rng = random.Random(seed)
    next_at = time.monotonic() + every_s
    while not shared.stop.wait(max(0.0, next_at - time.monotonic())):
        next_at += every_s
        ready = ready_workers(svc, shared)
        if not ready:
            shared.kill_attempts_without_ready += 1
            continue
        pid = rng.choice(ready)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        shared.kills.append([round(time.monotonic() - t0, 3), pid])


def staller(svc, shared: Shared, every_s: float, task_timeout_s: float, seed: int, t0: float) -> None:
    """Every ``every_s``: SIGSTOP one ready worker and SIGCONT it after half, then twice,
    ``task_timeout_s`` in turn (the broker waits out the first and replaces the worker in the second)."""
    rng = random.Random(seed + 1)
    holds = (task_timeout_s / 2, task_timeout_s * 2)
    next_at = time.monotonic() + every_s
    while not shared.stop.wait(max(0.0, next_at - time.monotonic())):
        next_at += every_s
        ready = ready_workers(svc, shared)
        if not ready:
            continue
        pid, hold = rng.choice(ready), holds[len(shared.stops) % 2]
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            continue
        shared.stops.append([round(time.monotonic() - t0, 3), pid, hold])
        shared.stop.wait(hold)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass  # replaced past its deadline, or killed meanwhile


def tcp_reader(endpoint: str, verifier: "Verifier", rate: float, timeout_s: float, shared: Shared,
               out: dict) -> None:
    """A second feed reading its own stream as frames over TCP, at ``rate`` batches/s; every
    batch is recomputed and compared."""
    from client import Feed

    try:
        with Feed(endpoint, transport="frames", timeout_s=timeout_s) as feed:
            gen = feed.generator()
            seq, next_at = 0, time.monotonic()
            while not shared.stop.is_set():
                x, y = next(gen)
                verifier.batch(seq, x, y, check_x=True)
                del x, y
                seq += 1
                next_at += 1.0 / rate
                shared.stop.wait(max(0.0, next_at - time.monotonic()))
            out["reconnects"] = feed.stats["reconnects"]
    except Exception as exc:  # reported in the verdict, never lost
        out["error"] = f"{type(exc).__name__}: {exc}"


def rss_sample(svc, shared: Shared, t0: float, status: dict | None) -> dict:
    server = proc_status(svc.pid) or {}
    worker_pids = (status or {}).get("worker_pids") or []
    workers = [s for s in (proc_status(pid) for pid in worker_pids) if s]
    me = proc_status(os.getpid()) or {}
    kids = children(svc.pid)
    return {
        "t_s": round(time.monotonic() - t0, 1),
        "batches": shared.batches,
        "epochs": shared.epochs,
        "kills": len(shared.kills),
        "worker_restarts": (status or {}).get("worker_restarts"),
        "server_samples_per_s": (status or {}).get("samples_per_s"),
        "server_rss_mib": mib(server.get("VmRSS")),
        "server_anon_mib": mib(server.get("RssAnon")),
        "server_threads": server.get("Threads"),
        "server_fds": open_fds(svc.pid),
        "server_children": None if kids is None else len(kids),
        "workers": len(workers),
        "workers_rss_mib": mib(sum(w.get("VmRSS", 0) for w in workers)),
        "workers_anon_mib": mib(sum(w.get("RssAnon", 0) for w in workers)),
        "workers_max_rss_mib": mib(max((w.get("VmRSS", 0) for w in workers), default=0)),
        "server_plus_workers_rss_mib": mib(server.get("VmRSS", 0) + sum(w.get("VmRSS", 0) for w in workers)),
        "consumer_rss_mib": mib(me.get("VmRSS")),
        "consumer_anon_mib": mib(me.get("RssAnon")),
        "slots": (status or {}).get("slots"),
        "clients": (status or {}).get("clients"),
        "load1": round(os.getloadavg()[0], 2),
    }


TABLE = [("t_s", "t(s)", 6, ".0f"), ("batches", "batches", 9, "d"), ("epochs", "epochs", 7, "d"),
         ("kills", "kills", 6, "d"), ("worker_restarts", "restarts", 9, "d"),
         ("samples_per_s", "samples/s", 10, ",.0f"), ("server_rss_mib", "srv MiB", 8, ".1f"),
         ("server_anon_mib", "srv anon", 9, ".1f"), ("server_fds", "fds", 5, "d"),
         ("server_children", "kids", 5, "d"), ("workers", "wrk", 4, "d"),
         ("workers_rss_mib", "wrk MiB", 8, ".1f"), ("workers_anon_mib", "wrk anon", 9, ".1f"),
         ("consumer_rss_mib", "cons MiB", 9, ".1f"), ("consumer_anon_mib", "cons anon", 10, ".1f"),
         ("slots_text", "slots f/fl/r/l", 15, "s"), ("load1", "load1", 7, ".2f")]


def table_header() -> str:
    return "".join(f"{title:>{width}}" for _, title, width, _ in TABLE)


def table_row(sample: dict) -> str:
    cells = []
    for key, _, width, fmt in TABLE:
        value = sample.get(key)
        cells.append(f"{'-' if value is None else format(value, fmt):>{width}}")
    return "".join(cells)


def monitor(svc, shared: Shared, every_s: float, t0: float, samples: list) -> None:
    """Every ``every_s``: sample RSS and status, print a row."""
    from client.status import query_status

    last_t, last_batches = time.monotonic(), shared.batches
    batch_size = svc.config.batch_size
    next_at = time.monotonic() + every_s
    while not shared.stop.wait(max(0.0, next_at - time.monotonic())):
        next_at += every_s
        try:
            status = query_status(svc.endpoint)
        except Exception:
            status = None
        if status is not None:
            shared.restarts = status.get("worker_restarts")
        sample = rss_sample(svc, shared, t0, status)
        now, batches = time.monotonic(), sample["batches"]
        sample["samples_per_s"] = round((batches - last_batches) * batch_size / max(now - last_t, 1e-9), 1)
        last_t, last_batches = now, batches
        slots = sample["slots"] or {}
        sample["slots_text"] = "/".join(str(slots.get(k, "-")) for k in ("free", "filling", "ready", "leased"))
        samples.append(sample)
        print(table_row(sample), flush=True)


# -- main -------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long to soak (default 10)")
    p.add_argument("--seconds", type=float, help="how long to soak, in seconds (overrides --minutes)")
    p.add_argument("--kill-every-s", type=float, default=2.0,
                   help="SIGKILL a random ready worker this often (default 2.0; 0 = never)")
    p.add_argument("--stop-every-s", type=float, default=60.0,
                   help="SIGSTOP a random ready worker this often, for half then twice task_timeout_s "
                        "in turn (default 60; 0 = never)")
    p.add_argument("--task-timeout-s", type=float, default=5.0,
                   help="the server's task_timeout_s, the floor of its hung-worker deadline (default 5)")
    p.add_argument("--tcp-rate", type=float, default=20.0,
                   help="batches/s of a second feed reading frames over loopback TCP (default 20; 0 = none)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--samples", type=int, default=20480, help="dataset size (default 20480)")
    p.add_argument("--image", type=int, default=32, help="image side, pixels (default 32; crop is side-4)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--seed", type=int, default=7, help="stream seed (default 7)")
    p.add_argument("--check-every", type=int, default=1,
                   help="recompute and compare x for every Nth batch (default 1: all); the batches "
                        "just after a kill are always compared")
    p.add_argument("--sample-every-s", type=float, default=10.0,
                   help="RSS/status sampling interval (default 10)")
    p.add_argument("--timeout-s", type=float, default=30.0, help="the Feed's timeout_s (default 30)")
    benchlib.add_output_options(p, out_help="the JSON results file")
    p.add_argument("--server-log", type=Path,
                   help="where the server's and workers' stderr go (default: next to --out, .server.log)")
    args = p.parse_args()
    args.duration_s = args.seconds if args.seconds is not None else args.minutes * 60
    if args.duration_s <= 0:
        p.error("the duration must be positive")
    if args.check_every < 1:
        p.error("--check-every must be at least 1")
    if args.image < 5:
        p.error("--image must be at least 5")
    if args.out is None:
        args.out = benchlib.output_folder(p, args) / "soak.json"
    if args.server_log is None:
        args.server_log = args.out.with_suffix(".server.log")
    return args


def start_service(svc, log_path: Path):
    """Start ``svc`` with fd 2 pointing at ``log_path``: the spawned server, and the workers it
    spawns, inherit it, so a restart warning every few seconds does not bury the table."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.dup2(fd, 2)
        svc.start()
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def tail(path: Path, lines: int = 40) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def tcp_summary(verifier: "Verifier | None", out: dict) -> dict | None:
    if verifier is None:
        return None
    verifier.end_epoch(verifier.totals["batches"] // verifier.steps, complete=False)
    t = verifier.totals
    return {"batches": t["batches"], "x_checked": t["x_checked"], "x_mismatches": t["x_mismatches"],
            "label_mismatches": t["label_mismatches"], "duplicates": t["duplicates"], "losses": t["losses"],
            "unexpected_ids": t["unexpected"], "mismatch_examples": verifier.mismatches, **out}


def write_json(path: Path, result: dict) -> None:
    """Indented JSON, with each per-epoch row on one line."""
    rows = result["per_epoch"]["rows"]
    result["per_epoch"]["rows"] = [f"@@row{i}@@" for i in range(len(rows))]
    text = json.dumps(result, indent=2)
    for i, row in enumerate(rows):
        text = text.replace(f'"@@row{i}@@"', json.dumps(row), 1)
    result["per_epoch"]["rows"] = rows
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def main() -> int:
    args = parse_args()
    from client import Feed
    from loader_server import Config, Service

    features = np.random.default_rng(args.seed).integers(0, 256, (args.samples, args.image, args.image, 3),
                                                         dtype=np.uint8)
    labels = np.arange(args.samples, dtype=np.int64)  # the labels are the sample ids
    crop = args.image - 4
    augment = [dict(AUGMENT[0], size=[crop, crop]), *AUGMENT[1:]]
    endpoint = f"tcp://127.0.0.1:{benchlib.free_port()}" if args.tcp_rate > 0 else None
    config = Config(batch_size=args.batch_size, workers=args.workers, seed=args.seed, augment=augment,
                    name=f"soak-{os.getpid()}", max_worker_restarts=100_000, endpoint=endpoint,
                    task_timeout_s=args.task_timeout_s)
    result = {
        "benchmark": "soak",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"duration_s": args.duration_s, "kill_every_s": args.kill_every_s, "workers": args.workers,
                     "samples": args.samples, "image": [args.image, args.image, 3], "batch_size": args.batch_size,
                     "seed": args.seed, "augment": augment, "check_every": args.check_every,
                     "sample_every_s": args.sample_every_s, "feed_timeout_s": args.timeout_s,
                     "stop_every_s": args.stop_every_s, "tcp_rate": args.tcp_rate,
                     "task_timeout_s": config.task_timeout_s,
                     "server_log": str(args.server_log)},
        "machine": benchlib.machine_info(), "versions": benchlib.versions(),
        "ringfeed_source": benchlib.ringfeed_source(),
    }
    verifier = Verifier(config, features, labels)
    tcp_verifier = Verifier(config, features, labels) if args.tcp_rate > 0 else None
    tcp_out: dict = {"reconnects": None, "error": None}
    shared = Shared()
    samples: list[dict] = []
    threads: list[threading.Thread] = []
    error = None
    interrupted = False
    max_gap = {"s": 0.0, "seq": None}
    gaps_over_1s: list[list] = []
    svc = Service(config, features=features, labels=labels)
    try:
        log(f"starting the service ({args.workers} workers, {args.samples} x {args.image}x{args.image}x3, "
            f"batch {args.batch_size}); server log: {args.server_log}")
        started = time.monotonic()
        start_service(svc, args.server_log)
        result["startup_s"] = round(time.monotonic() - started, 2)
        del features  # the verifier and the server have their own copies in shared memory
        with Feed(svc.endpoint, timeout_s=args.timeout_s, transport="shm") as feed:
            if feed.steps_per_epoch != verifier.steps:
                raise RuntimeError(f"the server says {feed.steps_per_epoch} steps per epoch, "
                                   f"the verifier {verifier.steps}")
            result["settings"].update(feed_prefetch=feed.prefetch, slots=svc.config.slots)
            t0 = time.monotonic()
            from client.status import query_status

            start = rss_sample(svc, shared, t0, query_status(svc.endpoint))
            result["rss_start"] = start
            kills = f"killing a ready worker every {args.kill_every_s} s" if args.kill_every_s > 0 else "no kills"
            log(f"soaking for {args.duration_s:.0f} s, {kills}; {feed.steps_per_epoch} batches per epoch")
            print(table_header(), flush=True)
            threads.append(threading.Thread(target=monitor, name="soak-monitor", daemon=True,
                                            args=(svc, shared, args.sample_every_s, t0, samples)))
            if args.kill_every_s > 0:
                threads.append(threading.Thread(target=killer, name="soak-killer", daemon=True,
                                                args=(svc, shared, args.kill_every_s, args.seed, t0)))
            if args.stop_every_s > 0:
                threads.append(threading.Thread(target=staller, name="soak-staller", daemon=True,
                                                args=(svc, shared, args.stop_every_s, config.task_timeout_s,
                                                      args.seed, t0)))
            if tcp_verifier is not None:
                threads.append(threading.Thread(target=tcp_reader, name="soak-tcp-reader", daemon=True,
                                                args=(svc.endpoint, tcp_verifier, args.tcp_rate, args.timeout_s,
                                                      shared, tcp_out)))
            for thread in threads:
                thread.start()
            deadline = t0 + args.duration_s
            seen_kills = 0
            check_until = -1  # compare every batch up to this seq (set after each kill)
            window = svc.config.slots + feed.prefetch + 2
            gen = feed.generator()
            seq = 0
            last = time.monotonic()
            try:
                while time.monotonic() < deadline:
                    x, y = next(gen)
                    now = time.monotonic()
                    if now - last > max_gap["s"]:
                        max_gap.update(s=round(now - last, 4), seq=seq)
                    if now - last > 1.0 and len(gaps_over_1s) < MAX_EXAMPLES:
                        gaps_over_1s.append([round(now - t0, 2), seq, round(now - last, 3)])
                    last = now
                    if len(shared.kills) != seen_kills:
                        seen_kills = len(shared.kills)
                        check_until = seq + window
                    verifier.batch(seq, x, y, seq % args.check_every == 0 or seq <= check_until)
                    del x, y
                    seq += 1
                    shared.batches = seq
                    shared.epochs = verifier.complete_epochs
                position = feed.position
                if position != divmod(seq, verifier.steps):
                    verifier._record("position", seq, *divmod(seq, verifier.steps), got=list(position))
                    verifier.totals["label_mismatches"] += 1
            except KeyboardInterrupt:
                interrupted = True
                log("interrupted: reporting what was seen so far")
            finally:
                shared.stop.set()
                for thread in threads:
                    thread.join(10)
            elapsed = time.monotonic() - t0
            final_status = query_status(svc.endpoint)
            end = rss_sample(svc, shared, t0, final_status)
            result["rss_end"] = end
            result["feed_stats"] = dict(feed.stats)
            del gen
            feed.close()
    except Exception as exc:
        error = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
        log(f"ERROR: {type(exc).__name__}: {exc}")
        final_status = None
        elapsed = time.monotonic() - t0 if "t0" in locals() else 0.0
    finally:
        shared.stop.set()
        stopping = time.monotonic()
        svc.stop()
        result["shutdown_s"] = round(time.monotonic() - stopping, 2)
        verifier.close()
        if tcp_verifier is not None:
            tcp_verifier.close()

    partial_epoch = verifier.epoch_batches
    verifier.end_epoch(verifier.totals["batches"] // verifier.steps, complete=False)
    totals = verifier.totals
    kills = len(shared.kills)
    restarts = (final_status or {}).get("worker_restarts", shared.restarts)
    result.update({
        "elapsed_s": round(elapsed, 2),
        "interrupted": interrupted,
        "error": error,
        "batches_delivered": totals["batches"],
        "samples_delivered": totals["batches"] * args.batch_size,
        "samples_per_s": round(totals["batches"] * args.batch_size / elapsed, 1) if elapsed else None,
        "steps_per_epoch": verifier.steps,
        "epochs_completed": verifier.complete_epochs,
        "partial_epoch_batches": partial_epoch,
        "duplicates": totals["duplicates"],
        "losses": totals["losses"],
        "unexpected_ids": totals["unexpected"],
        "out_of_range_ids": totals["bad_ids"],
        "label_mismatches": totals["label_mismatches"],
        "x_checked": totals["x_checked"],
        "x_mismatches": totals["x_mismatches"],
        "mismatch_examples": verifier.mismatches,
        "worker_kills": kills,
        "kill_ticks_without_a_ready_worker": shared.kill_attempts_without_ready,
        "kill_errors": shared.kill_errors[:MAX_EXAMPLES],
        "kills": shared.kills,
        "worker_stops": shared.stops,
        "tcp_reader": tcp_summary(tcp_verifier, tcp_out),
        "worker_restarts": restarts,
        "max_gap_between_batches_s": max_gap["s"],
        "max_gap_at_seq": max_gap["seq"],
        "gaps_over_1s": gaps_over_1s,
        "final_status": final_status,
        "rss_samples": samples,
        "per_epoch": {"columns": EPOCH_COLUMNS, "rows": verifier.epochs},
    })
    if "rss_start" in result and "rss_end" in result:
        s, e = result["rss_start"], result["rss_end"]
        first = samples[0] if samples else s
        result["rss_growth_mib"] = {
            key: {"start": s.get(key), "first_sample": first.get(key), "end": e.get(key),
                  "end_minus_first_sample": (round(e[key] - first[key], 1)
                                             if e.get(key) is not None and first.get(key) is not None else None)}
            for key in ("server_rss_mib", "server_anon_mib", "workers_rss_mib", "server_plus_workers_rss_mib",
                        "consumer_rss_mib", "consumer_anon_mib", "server_fds", "server_children")}
    if error:
        result["server_log_tail"] = tail(args.server_log)

    integrity = verifier.failures() + (tcp_verifier.failures() if tcp_verifier is not None else 0)
    problems = []
    if tcp_out["error"]:
        problems.append(f"tcp reader: {tcp_out['error']}")
    if integrity:
        problems.append(f"{integrity} integrity failure(s)")
    if error:
        problems.append(f"error: {error['type']}: {error['message']}")
    if totals["batches"] == 0:
        problems.append("no batches delivered")
    if args.kill_every_s > 0 and kills == 0 and not interrupted:
        problems.append("no worker was killed")
    result["load_average_end"] = list(os.getloadavg())
    result["verdict"] = "PASS" if not problems else "FAIL: " + "; ".join(problems)
    write_json(args.out, result)

    print()
    print(f"elapsed            {result['elapsed_s']:.1f} s")
    print(f"batches delivered  {totals['batches']:,} ({result['samples_per_s'] or 0:,.0f} samples/s)")
    print(f"epochs completed   {verifier.complete_epochs} (+{partial_epoch} batches of a partial epoch)")
    print(f"duplicates/losses  {totals['duplicates']} / {totals['losses']} "
          f"(unexpected ids {totals['unexpected']}, out of range {totals['bad_ids']})")
    print(f"label mismatches   {totals['label_mismatches']}")
    print(f"x mismatches       {totals['x_mismatches']} of {totals['x_checked']:,} batches recomputed")
    print(f"worker kills       {kills} ({shared.kill_attempts_without_ready} ticks found no ready worker)")
    print(f"worker restarts    {restarts}")
    print(f"max batch gap      {max_gap['s']:.3f} s ({len(gaps_over_1s)} gaps over 1 s)")
    tcp = result.get("tcp_reader")
    if tcp:
        print(f"tcp reader         {tcp['batches']:,} batches, {tcp['x_mismatches']} x / "
              f"{tcp['label_mismatches']} label mismatches, {tcp['duplicates']} duplicates, "
              f"{tcp['losses']} losses, reconnects {tcp['reconnects']}"
              + (f", error {tcp['error']}" if tcp.get("error") else ""))
    print(f"worker stops       {len(result['worker_stops'])}")
    for label, key in (("start", "rss_start"), ("end", "rss_end")):
        r = result.get(key)
        if r:
            print(f"RSS {label:<5}          server {r['server_rss_mib']} MiB (anon {r['server_anon_mib']}), "
                  f"workers {r['workers_rss_mib']} MiB in {r['workers']} (anon {r['workers_anon_mib']}), "
                  f"consumer {r['consumer_rss_mib']} MiB (anon {r['consumer_anon_mib']}), "
                  f"server fds {r['server_fds']}, children {r['server_children']}")
    print(f"verdict            {result['verdict']}")
    log(f"wrote {args.out}")
    if integrity:
        return 1
    return 0 if not problems else 2


if __name__ == "__main__":
    sys.exit(main())
