"""What runs beside soak.py's consumer: the threads that SIGKILL and SIGSTOP workers, the second
feed reading frames over TCP and the monitor that samples /proc and the server's status.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import benchlib
from soak_checks import Verifier


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
    from ringfeed.status import query_status

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


def tcp_reader(endpoint: str, verifier: Verifier, rate: float, timeout_s: float, shared: Shared,
               out: dict) -> None:
    """A second feed reading its own stream as frames over TCP, at ``rate`` batches/s; every
    batch is recomputed and compared."""
    from ringfeed import Feed

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
    from ringfeed.status import query_status

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
