"""soak.py's result: the run's counts in the JSON's keys, the verdict, the JSON file (one line per
epoch row) and the printed summary.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchlib import log
from soak_checks import EPOCH_COLUMNS, MAX_EXAMPLES, Verifier
from soak_threads import Shared

RSS_GROWTH_KEYS = ("server_rss_mib", "server_anon_mib", "workers_rss_mib", "server_plus_workers_rss_mib",
                   "consumer_rss_mib", "consumer_anon_mib", "server_fds", "server_children")


class Run:
    """What the soak saw, filled in as it goes: an error part-way leaves the rest as it was."""

    def __init__(self):
        self.shared = Shared()
        self.samples: list[dict] = []  # the monitor's rows
        self.tcp_out: dict = {"reconnects": None, "error": None}
        self.t0: float | None = None  # when consuming began
        self.elapsed = 0.0
        self.interrupted = False
        self.error: dict | None = None
        self.final_status: dict | None = None
        self.max_gap = {"s": 0.0, "seq": None}
        self.gaps_over_1s: list[list] = []


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



def outcome(verifier: Verifier, tcp_verifier: Verifier | None, run: Run, args: argparse.Namespace) -> dict:
    """The run's counts, in the result's keys (ends the verifier's partial epoch)."""
    partial_epoch = verifier.epoch_batches
    verifier.end_epoch(verifier.totals["batches"] // verifier.steps, complete=False)
    totals, shared, elapsed = verifier.totals, run.shared, run.elapsed
    return {
        "elapsed_s": round(elapsed, 2),
        "interrupted": run.interrupted,
        "error": run.error,
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
        "worker_kills": len(shared.kills),
        "kill_ticks_without_a_ready_worker": shared.kill_attempts_without_ready,
        "kill_errors": shared.kill_errors[:MAX_EXAMPLES],
        "kills": shared.kills,
        "worker_stops": shared.stops,
        "tcp_reader": tcp_summary(tcp_verifier, run.tcp_out),
        "worker_restarts": (run.final_status or {}).get("worker_restarts", shared.restarts),
        "max_gap_between_batches_s": run.max_gap["s"],
        "max_gap_at_seq": run.max_gap["seq"],
        "gaps_over_1s": run.gaps_over_1s,
        "final_status": run.final_status,
        "rss_samples": run.samples,
        "per_epoch": {"columns": EPOCH_COLUMNS, "rows": verifier.epochs},
    }


def rss_growth(result: dict, samples: list[dict]) -> dict:
    """Per measure: at the start, at the first sample, at the end, and end minus first sample."""
    s, e = result["rss_start"], result["rss_end"]
    first = samples[0] if samples else s
    return {key: {"start": s.get(key), "first_sample": first.get(key), "end": e.get(key),
                  "end_minus_first_sample": (round(e[key] - first[key], 1)
                                             if e.get(key) is not None and first.get(key) is not None else None)}
            for key in RSS_GROWTH_KEYS}


def problems(result: dict, run: Run, integrity: int, args: argparse.Namespace) -> list[str]:
    """What makes the verdict FAIL, if anything."""
    found = []
    if run.tcp_out["error"]:
        found.append(f"tcp reader: {run.tcp_out['error']}")
    if integrity:
        found.append(f"{integrity} integrity failure(s)")
    if run.error:
        found.append(f"error: {run.error['type']}: {run.error['message']}")
    if result["batches_delivered"] == 0:
        found.append("no batches delivered")
    if args.kill_every_s > 0 and result["worker_kills"] == 0 and not run.interrupted:
        found.append("no worker was killed")
    return found


def print_summary(result: dict) -> None:
    print()
    print(f"elapsed            {result['elapsed_s']:.1f} s")
    print(f"batches delivered  {result['batches_delivered']:,} ({result['samples_per_s'] or 0:,.0f} samples/s)")
    print(f"epochs completed   {result['epochs_completed']} (+{result['partial_epoch_batches']} batches of a "
          "partial epoch)")
    print(f"duplicates/losses  {result['duplicates']} / {result['losses']} "
          f"(unexpected ids {result['unexpected_ids']}, out of range {result['out_of_range_ids']})")
    print(f"label mismatches   {result['label_mismatches']}")
    print(f"x mismatches       {result['x_mismatches']} of {result['x_checked']:,} batches recomputed")
    print(f"worker kills       {result['worker_kills']} ({result['kill_ticks_without_a_ready_worker']} ticks found "
          "no ready worker)")
    print(f"worker restarts    {result['worker_restarts']}")
    print(f"max batch gap      {result['max_gap_between_batches_s']:.3f} s ({len(result['gaps_over_1s'])} gaps "
          "over 1 s)")
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


def report(args: argparse.Namespace, result: dict, run: Run, verifier: Verifier,
           tcp_verifier: Verifier | None) -> int:
    """Complete the result, write it, print the summary; the exit status."""
    result.update(outcome(verifier, tcp_verifier, run, args))
    if "rss_start" in result and "rss_end" in result:
        result["rss_growth_mib"] = rss_growth(result, run.samples)
    if run.error:
        result["server_log_tail"] = tail(args.server_log)
    integrity = verifier.failures() + (tcp_verifier.failures() if tcp_verifier is not None else 0)
    found = problems(result, run, integrity, args)
    result["load_average_end"] = list(os.getloadavg())
    result["verdict"] = "PASS" if not found else "FAIL: " + "; ".join(found)
    write_json(args.out, result)
    print_summary(result)
    log(f"wrote {args.out}")
    if integrity:
        return 1
    return 0 if not found else 2
