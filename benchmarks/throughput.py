"""Loader-only throughput: how many augmented samples per second each loader hands its consumer.

Workload (benchlib): 20,000 synthetic 64x64x3 uint8 images, random 56x56 crop,
random horizontal flip, (x/255 - mean)/std to float32, batch 256. Every
contender delivers the same (256, 56, 56, 3) float32 batches; the consumer
takes each one and drops it at once.

Contenders are started and warmed up once, outside the timed region, then
measured round-robin: each round times every contender once (the order
rotates between rounds), each for ``--seconds`` after a few untimed batches.
Reported: the median over rounds of samples/s and MB/s of delivered x, and the
ratio to tf.data measured in the same invocation.

Three comparisons of issue #13 ride along, measured in the same rounds:
ringfeed serving samples of several fields (x a dict of the images and a
float32 (16,) ``meta`` vector, plus a float32 ``sample_weight``) against the
in-process numba kernel, as the two-field service is; ringfeed running the
augmentation as per-sample numpy in a ``python`` op (``python_ops.py``)
against the PyTorch DataLoader running the same function; and, in-process on
one thread, the cost per sample of that python op against the numba ops.

    .venv/bin/python benchmarks/throughput.py [--quick] [--rounds N] [--out DIR | --write-results]
"""

from __future__ import annotations

import argparse
import os
from contextlib import ExitStack

import benchlib
from benchlib import AUGMENT, BATCH, CROP, IMAGE, log
from throughput_contenders import (PYTHON_AUGMENT, ClassicGenerator, Contender, KerasPyDataset, NumbaInProcess,
                                   SampleCost, TfData, TorchLoader)
from throughput_ringfeed import (RingfeedGenerator, RingfeedMultiField, RingfeedPlainStores, RingfeedPrivate,
                                 RingfeedPythonOp, RingfeedTfDataset)

SAMPLE_BYTES = CROP[0] * CROP[1] * IMAGE[2] * 4  # one float32 output sample
MULTI_FIELD = {"inputs": ["features", "meta"], "targets": "labels", "sample_weight": "weight"}
KERNEL_TARGET = 0.9  # the bar: ringfeed delivers at least 0.9x the in-process kernel


# -- results ------------------------------------------------------------------

def summarize(contenders: list[Contender]) -> list[dict]:
    rows = []
    for c in contenders:
        rows.append({"name": c.name, "label": c.label, "group": c.group, "workers": c.workers,
                     "delivered": c.delivered,
                     "median_samples_per_s": benchlib.median(r["samples_per_s"] for r in c.rounds),
                     "median_mb_per_s": benchlib.median(r["mb_per_s"] for r in c.rounds),
                     "rounds": c.rounds})
    reference = next(r["median_samples_per_s"] for r in rows if r["name"] == "tf.data")
    for row in rows:
        row["ratio_to_tf_data"] = benchlib.ratio(row["median_samples_per_s"], reference)
    return rows


def compare(contenders: list[Contender], what: str, name: str, reference: str, target: float | None) -> dict:
    """``name``'s median samples/s over ``reference``'s, and the median of the rounds' own ratios
    (both were timed in every round); None where either was not measured."""
    by_name = {c.name: c for c in contenders}
    row = {"what": what, "contender": name, "reference": reference, "target": target, "ratio": None,
           "median_round_ratio": None}
    if name in by_name and reference in by_name:
        mine, theirs = by_name[name].samples_per_s, by_name[reference].samples_per_s
        row["ratio"], row["median_round_ratio"] = benchlib.same_run_ratios(mine, theirs)
    return row


def comparisons(contenders: list[Contender], cores: int) -> list[dict]:
    return [compare(contenders, "several fields (x: image + meta, sample_weight) vs the in-process kernel",
                    f"ringfeed-multi-field-generator-w{cores}", "numba-all-cores", KERNEL_TARGET),
            compare(contenders, "two fields (features, labels) vs the in-process kernel",
                    f"ringfeed-generator-w{cores}", "numba-all-cores", KERNEL_TARGET),
            compare(contenders, "python op vs PyTorch DataLoader, same per-sample function and workers",
                    f"ringfeed-python-op-generator-w{cores}", "torch-per-sample", 1.0)]


def per_sample_cost(costs: list[SampleCost]) -> dict:
    rows = [{"name": c.name, "label": c.label, "delivered": c.delivered,
             "median_us_per_sample": benchlib.median(1e6 / r["samples_per_s"] for r in c.rounds),
             "rounds": c.rounds} for c in costs]
    us = {row["name"]: row["median_us_per_sample"] for row in rows}
    return {"rows": rows, "python_op_over_numba": benchlib.ratio(us["per-sample-python-op"], us["per-sample-numba"]),
            "python_op_overhead_us": us["per-sample-python-op"] - us["per-sample-python-fn"]}


def plot(rows: list[dict], skipped: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, line) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [3, 2]})
    ordered = sorted(rows, key=lambda r: r["median_samples_per_s"])
    medians = [r["median_samples_per_s"] / 1e3 for r in ordered]
    lows = [m - min(x["samples_per_s"] for x in r["rounds"]) / 1e3 for m, r in zip(medians, ordered)]
    highs = [max(x["samples_per_s"] for x in r["rounds"]) / 1e3 - m for m, r in zip(medians, ordered)]
    colors = ["tab:orange" if r["group"] == "ringfeed" else "tab:blue" for r in ordered]
    bars.barh([r["label"] for r in ordered], medians, xerr=[lows, highs], color=colors, capsize=3)
    for y, (m, high, r) in enumerate(zip(medians, highs, ordered)):
        bars.text(m + high, y, f"  {r['ratio_to_tf_data']:.1f}x", va="center", fontsize=8)
    bars.set_xlabel("thousand samples/s (median; whiskers: min-max over rounds; label: x tf.data)")
    if skipped:
        bars.set_title("skipped: " + ", ".join(s["name"] for s in skipped), fontsize=8)

    by_name = {r["name"]: r for r in rows}
    for prefix, label, marker in (("ringfeed-generator-w", "ringfeed generator()", "o"),
                                  ("ringfeed-tf-dataset-w", "ringfeed as_tf_dataset()", "s")):
        points = sorted((r["workers"], r["median_samples_per_s"] / 1e3) for r in rows
                        if r["name"].startswith(prefix))
        line.plot(*zip(*points), marker=marker, label=label)
    for name, style in (("numba-all-cores", "--"), ("numba-1-thread", ":"), ("tf.data", "-.")):
        line.axhline(by_name[name]["median_samples_per_s"] / 1e3, color="gray", linestyle=style,
                     label=by_name[name]["label"])
    line.set_xlabel("ringfeed workers")
    line.set_ylabel("thousand samples/s (median)")
    line.set_xticks(sorted({r["workers"] for r in rows if r["group"] == "ringfeed"}))
    line.set_ylim(bottom=0)
    line.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the run ------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    """The arguments, with ``seconds``, ``samples`` and ``warmup`` filled in for a full or quick run."""
    p = benchlib.parser(__doc__.split("\n\n")[0], rounds=5, quick_rounds=2)
    p.add_argument("--seconds", type=float, help="timed seconds per contender per round (default 3, 0.25 quick)")
    p.add_argument("--samples", type=int, help="dataset size (default 20000, 2048 quick)")
    args = benchlib.parse(p)
    args.seconds = args.seconds or (0.25 if args.quick else 3.0)
    args.samples = args.samples or (2048 if args.quick else 20000)
    args.warmup = 2 if args.quick else 16  # untimed batches per round: covers ringfeed's prefetch
    return args


def forking_contenders(features, labels, cores: int) -> tuple[list[Contender], list[dict]]:
    """The loaders that fork workers (PyTorch's, if importable, and Keras'), and those skipped."""
    forking: list[Contender] = [KerasPyDataset(features, labels, cores)]
    reason = benchlib.torch_missing()
    if reason:
        log(f"skipping the PyTorch DataLoader contenders: {reason}")
        return forking, [{"name": name, "reason": reason} for name in ("torch-per-sample", "torch-numba-batch")]
    return [TorchLoader(features, labels, cores, False), TorchLoader(features, labels, cores, True)] + forking, []


def ringfeed_contenders(stack: ExitStack, features, labels, fields, cores: int, skipped: list[dict]) -> list:
    """A service of its own for each ringfeed contender (those that cannot run join ``skipped``)."""
    from ringfeed.server import ConfigError

    ringfeed: list[Contender] = []
    for kind, w, endpoint in benchlib.ringfeed_services(stack, "tp", (RingfeedGenerator, RingfeedTfDataset),
                                                        features, labels):
        ringfeed.append(kind(endpoint, w))
    try:
        for kind, w, endpoint in benchlib.ringfeed_services(stack, "tp", (RingfeedPrivate,), features,
                                                            labels, counts=[cores], private_data=True):
            ringfeed.append(kind(endpoint, w))
    except ConfigError as exc:  # one copy per worker may not fit in this host's memory
        log(f"skipping the private_data contender: {exc}")
        skipped.append({"name": RingfeedPrivate.named(cores), "reason": str(exc)})
    for kind, w, endpoint in benchlib.ringfeed_services(stack, "tp", (RingfeedPlainStores,), features, labels,
                                                        counts=[cores], streaming_stores=False):
        ringfeed.append(kind(endpoint, w))
    for kind, w, endpoint in benchlib.ringfeed_services(stack, "tp", (RingfeedMultiField,), None, None,
                                                        counts=[cores], fields=fields, **MULTI_FIELD):
        ringfeed.append(kind(endpoint, w))
    for kind, w, endpoint in benchlib.ringfeed_services(stack, "tp", (RingfeedPythonOp,), features, labels,
                                                        counts=[cores], augment=PYTHON_AUGMENT):
        ringfeed.append(kind(endpoint, w))
    return ringfeed


def run_rounds(measured: list[Contender], rounds: int, seconds: float, warmup: int) -> None:
    """Each round times every contender once, the order rotated by one each round."""
    for r in range(rounds):
        shift = r % len(measured)
        for c in measured[shift:] + measured[:shift]:
            with benchlib.OtherLoad() as load, c.round() as pull:
                batches, elapsed = benchlib.timed(pull, seconds, warmup)
            rate = batches * BATCH / elapsed
            c.rounds.append({"samples_per_s": rate, "mb_per_s": rate * SAMPLE_BYTES / 1e6,
                             "batches": batches, "seconds": elapsed, "other_load": load.share})
            log(f"[round {r + 1}/{rounds}] {c.name:<24} {rate:>10,.0f} samples/s"
                f"  (other processes: {load.share:.0%} of the cores)")


def measure(args: argparse.Namespace, features, labels, fields, cores: int) \
        -> tuple[list[Contender], list[SampleCost], list[dict]]:
    """Start every contender, time them in rounds, stop them: (loaders in report order, costs, skipped)."""
    forking, skipped = forking_contenders(features, labels, cores)
    with ExitStack() as stack:
        # Forked workers first: numba's OpenMP layer aborts a child forked after the parent ran a
        # parallel kernel, and no loader should inherit the others' threads.
        benchlib.start_all(stack, forking, args.warmup)
        ringfeed = ringfeed_contenders(stack, features, labels, fields, cores, skipped)
        costs = [SampleCost(features, labels, kind) for kind in SampleCost.KINDS]
        rest = [ClassicGenerator(features, labels), NumbaInProcess(features, labels, False),
                NumbaInProcess(features, labels, True), TfData(features, labels)] + ringfeed + costs
        benchlib.start_all(stack, rest, args.warmup)
        contenders = rest[:4] + forking[::-1] + ringfeed  # report order: simplest first, ringfeed last
        run_rounds(contenders + costs, args.rounds, args.seconds, args.warmup)
    return contenders, costs, skipped


def print_summary(result: dict) -> None:
    print(f"{'contender':<36}{'samples/s':>12}{'MB/s':>9}{'x tf.data':>11}")
    for row in result["contenders"]:
        print(f"{row['name']:<36}{row['median_samples_per_s']:>12,.0f}{row['median_mb_per_s']:>9,.0f}"
              f"{row['ratio_to_tf_data']:>11.2f}")
    for s in result["skipped"]:
        print(f"{s['name']:<36} skipped: {s['reason']}")
    benchlib.print_comparisons(result["comparisons"])
    cost = result["per_sample_cost"]
    for row in cost["rows"]:
        print(f"{row['label']:<64}{row['median_us_per_sample']:>8.2f} us/sample")
    print(f"python op / numba ops: {cost['python_op_over_numba']:.1f}x per sample")


def main() -> None:
    args = parse_args()
    cores = os.cpu_count() or 1
    features, labels = benchlib.make_images(args.samples)
    fields = benchlib.make_fields(features, labels)
    result = benchlib.header("throughput", args, samples=args.samples, batch_size=BATCH,
                             seconds_per_round=args.seconds, warmup_batches_per_round=args.warmup,
                             image=list(IMAGE), crop=list(CROP), augment=AUGMENT, sample_bytes=SAMPLE_BYTES,
                             multi_field=MULTI_FIELD,
                             multi_field_shapes={k: [list(v.shape[1:]), v.dtype.name] for k, v in fields.items()},
                             python_augment=PYTHON_AUGMENT)
    contenders, costs, skipped = measure(args, features, labels, fields, cores)
    rows = summarize(contenders)
    result.update(contenders=rows, skipped=skipped, comparisons=comparisons(contenders, cores),
                  per_sample_cost=per_sample_cost(costs))
    machine = result["machine"]
    benchlib.write_json(args.out / "throughput.json", result)
    plot(rows, skipped, args.out / "throughput.png",
         f"Loader throughput, 64x64x3 uint8 -> crop 56, flip, normalize, batch {BATCH}; "
         f"{machine['cpu']}, {machine['cores']} cores; median of {args.rounds} rounds")
    log(f"wrote {args.out / 'throughput.png'}")
    print_summary(result)


if __name__ == "__main__":
    main()
