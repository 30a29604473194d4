"""Read a ringfeed stream and print one JSON line per batch: where it is and the sha256 of its arrays.

    python /opt/ringfeed/check_stream.py [--epochs 2] [--pace-s 0]

A smoke test of a deployment that needs no TensorFlow (it is in the loader
image). It reads the environment train.py reads: ``RINGFEED_ENDPOINT`` (one
endpoint, or several to fan in: comma-separated or a ``{1..3}`` range), ``RINGFEED_TRANSPORT``,
``RINGFEED_TIMEOUT_S`` and ``RINGFEED_CURVE_SERVER_KEY`` /
``RINGFEED_CURVE_SECRET_KEY``. The same data, seed and config print the same
lines wherever the loaders run and however many there are, so two deployments
compare with ``diff``.

Lines: first ``{"spec": ...}``, then per batch ``{"position": [epoch, index],
"sha256": [...], "down": [...], "missed": n}`` (the last two for a fan-in).
A failure prints ``{"error": "<exception class>", "message": ..., "after_s":
seconds since the last batch}`` and exits 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time


def feed_from_env():
    from ringfeed import open_feed

    raw = os.environ.get("RINGFEED_ENDPOINT", "tcp://loader:5555").strip()
    if not raw:
        raise SystemExit("RINGFEED_ENDPOINT is empty; set it to e.g. tcp://loader:5555")
    options = {"curve_server_key": os.environ.get("RINGFEED_CURVE_SERVER_KEY"),
               "curve_secret_key": os.environ.get("RINGFEED_CURVE_SECRET_KEY"),
               "transport": os.environ.get("RINGFEED_TRANSPORT")}
    return open_feed(raw, timeout_s=float(os.environ.get("RINGFEED_TIMEOUT_S", 30)),
                     **{k: v for k, v in options.items() if v})


def digests(batch) -> list[str]:
    arrays = batch.values() if isinstance(batch, dict) else batch
    out = []
    for array in arrays:
        if isinstance(array, dict):
            out += digests([array[k] for k in sorted(array)])
        else:
            out.append(hashlib.sha256(memoryview(array).cast("B")).hexdigest())
    return out


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def read(epochs: int, pace_s: float) -> None:
    last = time.monotonic()
    try:
        with feed_from_env() as feed:
            spec = feed.spec
            emit({"spec": {"batch_size": spec.batch_size, "steps_per_epoch": feed.steps_per_epoch,
                           "samples": spec.samples, "fields": [f.name for f in spec.fields],
                           "transport": getattr(feed, "transport", None)}})
            batches = feed.generator()
            for _ in range(epochs * feed.steps_per_epoch):
                batch = next(batches)
                last = time.monotonic()
                epoch, index = feed.position
                seq = epoch * feed.steps_per_epoch + index - 1  # position is the next batch's
                record = {"position": list(divmod(seq, feed.steps_per_epoch)), "sha256": digests(batch)}
                if hasattr(feed, "down"):
                    record.update(down=feed.down, missed=feed.stats["missed"])
                emit(record)
                del batch
                time.sleep(pace_s)
    except Exception as exc:  # reported as one line for whoever runs this, then exit 1
        emit({"error": type(exc).__name__, "message": str(exc), "after_s": round(time.monotonic() - last, 3)})
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--pace-s", type=float, default=0.0, help="seconds to sleep after each batch")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.pace_s < 0:
        parser.error(f"--epochs must be >= 1 and --pace-s >= 0, got {args.epochs} and {args.pace_s}")
    read(args.epochs, args.pace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
