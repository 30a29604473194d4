"""A trainer that gets a Ctrl-C while its ``Service`` runs (run by tests/test_cli.py).

It sends SIGINT to its whole process group, as a terminal does, catches the
KeyboardInterrupt, and reads on from the same service: more batches than the
ring holds, so none of them can be left over from before the interrupt.

    python tests/sigint_trainer.py NAME
"""

import os
import signal
import sys
import time

import numpy as np

from ringfeed import Feed
from ringfeed.status import query_status
from ringfeed.server import Config, Service

SAMPLES, BATCH, SLOTS = 64, 4, 8
INTERRUPT_WAIT_S = 5.0  # the KeyboardInterrupt comes at once; this only bounds the wait for it
STOP_GRACE_S = 0.5  # longer than a server that took the SIGINT needs to stop (its TICK_S)


def main(name: str) -> None:
    config = Config(batch_size=BATCH, workers=1, slots=SLOTS, name=name)
    features = np.arange(SAMPLES * 3, dtype=np.float32).reshape(SAMPLES, 3)
    with Service(config, features=features, labels=np.arange(SAMPLES)) as service:
        with Feed(service.endpoint, prefetch=2) as feed:
            batches = feed.generator()
            print("before", sorted(next(batches)[1].tolist()), flush=True)
            try:
                os.killpg(os.getpgid(0), signal.SIGINT)
                time.sleep(INTERRUPT_WAIT_S)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
            time.sleep(STOP_GRACE_S)
            labels = [next(batches)[1].copy() for _ in range(3 * SLOTS)]
            print("after", len(labels), "batches; labels of the last:", sorted(labels[-1].tolist()), flush=True)
            status = query_status(service.endpoint)
            print("status", "ready" if status and status["ready"] else "gone", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
