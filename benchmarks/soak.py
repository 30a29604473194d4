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
import os
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import benchlib
from benchlib import log
from soak_checks import EPOCH_COLUMNS, MAX_EXAMPLES, Verifier  # noqa: F401 (tests read soak.EPOCH_COLUMNS)
from soak_report import Run, report
from soak_threads import killer, monitor, rss_sample, staller, table_header, tcp_reader

AUGMENT = [{"op": "random_crop", "size": [28, 28]}, {"op": "flip_lr"},
           {"op": "normalize", "mean": 0.5, "std": 0.25}]


# -- the run --------------------------------------------------------------------

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


def workload(args: argparse.Namespace):
    """(features, labels, augment, config): images whose labels are their sample ids, the augmentation
    for their size and the service's Config."""
    from ringfeed.server import Config

    features = np.random.default_rng(args.seed).integers(0, 256, (args.samples, args.image, args.image, 3),
                                                         dtype=np.uint8)
    labels = np.arange(args.samples, dtype=np.int64)  # the labels are the sample ids
    crop = args.image - 4
    augment = [dict(AUGMENT[0], size=[crop, crop]), *AUGMENT[1:]]
    endpoint = f"tcp://127.0.0.1:{benchlib.free_port()}" if args.tcp_rate > 0 else None
    config = Config(batch_size=args.batch_size, workers=args.workers, seed=args.seed, augment=augment,
                    name=f"soak-{os.getpid()}", max_worker_restarts=100_000, endpoint=endpoint,
                    task_timeout_s=args.task_timeout_s)
    return features, labels, augment, config


def header(args: argparse.Namespace, augment: list, config) -> dict:
    return {
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


def side_threads(svc, args: argparse.Namespace, tcp_verifier: Verifier | None, run: Run) -> list:
    """The monitor, and the killer, staller and TCP reader that were asked for (not started)."""
    shared, t0 = run.shared, run.t0
    threads = [threading.Thread(target=monitor, name="soak-monitor", daemon=True,
                                args=(svc, shared, args.sample_every_s, t0, run.samples))]
    if args.kill_every_s > 0:
        threads.append(threading.Thread(target=killer, name="soak-killer", daemon=True,
                                        args=(svc, shared, args.kill_every_s, args.seed, t0)))
    if args.stop_every_s > 0:
        threads.append(threading.Thread(target=staller, name="soak-staller", daemon=True,
                                        args=(svc, shared, args.stop_every_s, svc.config.task_timeout_s,
                                              args.seed, t0)))
    if tcp_verifier is not None:
        threads.append(threading.Thread(target=tcp_reader, name="soak-tcp-reader", daemon=True,
                                        args=(svc.endpoint, tcp_verifier, args.tcp_rate, args.timeout_s,
                                              shared, run.tcp_out)))
    return threads


def consume(gen, verifier: Verifier, args: argparse.Namespace, run: Run, window: int) -> int:
    """Pull and check batches until the soak's time is up; the number pulled. Every batch of the
    ``window`` after a kill is compared in full."""
    shared, t0, max_gap, gaps_over_1s = run.shared, run.t0, run.max_gap, run.gaps_over_1s
    deadline = t0 + args.duration_s
    seen_kills = 0
    check_until = -1  # compare every batch up to this seq (set after each kill)
    seq = 0
    last = time.monotonic()
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
    return seq


def soak(svc, args: argparse.Namespace, verifier: Verifier, tcp_verifier: Verifier | None, run: Run,
         result: dict) -> None:
    """Consume from the started service for the soak's duration, the side threads running."""
    from ringfeed import Feed
    from ringfeed.status import query_status

    with Feed(svc.endpoint, timeout_s=args.timeout_s, transport="shm") as feed:
        if feed.steps_per_epoch != verifier.steps:
            raise RuntimeError(f"the server says {feed.steps_per_epoch} steps per epoch, "
                               f"the verifier {verifier.steps}")
        result["settings"].update(feed_prefetch=feed.prefetch, slots=svc.config.slots)
        run.t0 = time.monotonic()
        result["rss_start"] = rss_sample(svc, run.shared, run.t0, query_status(svc.endpoint))
        kills = f"killing a ready worker every {args.kill_every_s} s" if args.kill_every_s > 0 else "no kills"
        log(f"soaking for {args.duration_s:.0f} s, {kills}; {feed.steps_per_epoch} batches per epoch")
        print(table_header(), flush=True)
        threads = side_threads(svc, args, tcp_verifier, run)
        for thread in threads:
            thread.start()
        gen = feed.generator()
        try:
            seq = consume(gen, verifier, args, run, svc.config.slots + feed.prefetch + 2)
            position = feed.position
            if position != divmod(seq, verifier.steps):
                verifier._record("position", seq, *divmod(seq, verifier.steps), got=list(position))
                verifier.totals["label_mismatches"] += 1
        except KeyboardInterrupt:
            run.interrupted = True
            log("interrupted: reporting what was seen so far")
        finally:
            run.shared.stop.set()
            for thread in threads:
                thread.join(10)
        run.elapsed = time.monotonic() - run.t0
        run.final_status = query_status(svc.endpoint)
        result["rss_end"] = rss_sample(svc, run.shared, run.t0, run.final_status)
        result["feed_stats"] = dict(feed.stats)
        del gen
        feed.close()


def main() -> int:
    args = parse_args()
    from ringfeed.server import Service

    features, labels, augment, config = workload(args)
    result = header(args, augment, config)
    verifier = Verifier(config, features, labels)
    tcp_verifier = Verifier(config, features, labels) if args.tcp_rate > 0 else None
    run = Run()
    svc = Service(config, features=features, labels=labels)
    try:
        log(f"starting the service ({args.workers} workers, {args.samples} x {args.image}x{args.image}x3, "
            f"batch {args.batch_size}); server log: {args.server_log}")
        started = time.monotonic()
        start_service(svc, args.server_log)
        result["startup_s"] = round(time.monotonic() - started, 2)
        del features  # the verifier and the server have their own copies in shared memory
        soak(svc, args, verifier, tcp_verifier, run, result)
    except Exception as exc:
        run.error = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
        log(f"ERROR: {type(exc).__name__}: {exc}")
        run.final_status = None
        run.elapsed = time.monotonic() - run.t0 if run.t0 is not None else 0.0
    finally:
        run.shared.stop.set()
        stopping = time.monotonic()
        svc.stop()
        result["shutdown_s"] = round(time.monotonic() - stopping, 2)
        verifier.close()
        if tcp_verifier is not None:
            tcp_verifier.close()
    return report(args, result, run, verifier, tcp_verifier)


if __name__ == "__main__":
    sys.exit(main())
