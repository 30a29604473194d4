"""benchmarks/soak.py: its checker catches what it must, and a short soak under kills passes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import rgb_images

from ringfeed.server import Config

REPO = Path(__file__).resolve().parent.parent
SOAK = REPO / "benchmarks" / "soak.py"
sys.path.insert(0, str(SOAK.parent))

import soak  # noqa: E402

SMALL = [{"op": "random_crop", "size": [12, 12]}, {"op": "flip_lr"}, {"op": "normalize", "mean": 0.5, "std": 0.25}]


def _verifier(name):
    config = Config(batch_size=8, workers=1, seed=3, name=name, augment=SMALL)
    return soak.Verifier(config, rgb_images(64, 16), np.arange(64))


def _batch(v, seq):
    batch = v.maker.empty_batch()
    v.maker.make(*divmod(seq, v.steps), batch)
    return batch["features"], batch["labels"]


def test_the_verifier_counts_duplicates_losses_and_corrupt_batches(name):
    v = _verifier(name)
    try:
        for seq in range(v.steps):  # a clean epoch
            v.batch(seq, *_batch(v, seq), check_x=True)
        assert v.failures() == 0 and v.complete_epochs == 1
        assert v.epochs[0][soak.EPOCH_COLUMNS.index("ids_delivered")] == 64

        # epoch 1: batch 2 delivered in place of batch 3 (8 duplicates, 8 losses), batch 5 corrupted
        for seq in range(v.steps, 2 * v.steps):
            x, y = _batch(v, seq - 1 if seq == v.steps + 3 else seq)
            if seq == v.steps + 5:
                x = x.copy()
                x[0, 0, 0, 0] += 1
            v.batch(seq, x, y, check_x=True)
        t = v.totals
        assert (t["duplicates"], t["losses"], t["label_mismatches"], t["x_mismatches"]) == (8, 8, 1, 2)
        assert v.failures() > 0 and {m["kind"] for m in v.mismatches} == {"labels", "x"}
    finally:
        v.close()
    assert not os.path.exists(f"/dev/shm/{v.segment}")


def test_a_short_soak_under_kills_passes(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(SOAK), "--seconds", "10", "--kill-every-s", "2",
                           "--stop-every-s", "2.5", "--task-timeout-s", "1", "--tcp-rate", "20",
                           "--samples", "4096", "--sample-every-s", "4", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["verdict"] == "PASS"
    assert result["worker_kills"] >= 3 and result["worker_restarts"] >= 3
    assert result["epochs_completed"] >= 1 and result["x_checked"] == result["batches_delivered"]
    assert result["duplicates"] == result["losses"] == result["x_mismatches"] == 0
    assert len(result["worker_stops"]) >= 2  # one waited out, one past the deadline
    tcp = result["tcp_reader"]
    assert tcp["batches"] >= 50 and tcp["x_checked"] == tcp["batches"] and tcp["error"] is None
    assert tcp["duplicates"] == tcp["losses"] == tcp["x_mismatches"] == tcp["label_mismatches"] == 0
    assert len(result["rss_samples"]) >= 2 and result["rss_end"]["server_rss_mib"] > 0
    assert (tmp_path / "soak.server.log").exists()
