"""Image files end to end: JPEGs decoded, RandomResizedCrop(224), flip, normalize, batch 128, side by side.

Data (made once, cached under ``--data-dir``): 5,000 JPEGs at quality 90, sides
between 256 and 512 pixels, cut from the real photographs that scikit-learn
ships (and scikit-image, where it is installed) by random crops, rescales and
colour shifts, in 10 class folders; and the same folder packed (``ringfeed
pack``). The pipeline: decode, RandomResizedCrop(224, scale (0.08, 1), ratio
(3/4, 4/3)), random horizontal flip, normalize to float32, batch 128, NHWC;
and the same without normalize, uint8.

Contenders, each started and warmed once, then measured round-robin (the
order rotates between rounds) for ``--seconds`` each after a few untimed
batches, once the loader timed before has finished refilling its buffers:
tf.data (``decode_and_crop_jpeg`` decodes only the crop window,
``map(AUTOTUNE)``, prefetch); the PyTorch DataLoader, one worker per core,
with torchvision (``decode_jpeg`` + ``v2.RandomResizedCrop(antialias=True)``)
or with Pillow (full decode, then ``resize(box=...)``, antialiased bilinear as
ringfeed's); Keras ``image_dataset_from_directory`` (decode + resize to 224
only, a reference); the in-process limit: ringfeed's own ``BatchMaker`` on
the packed file in one process per core, nothing delivered, rates summed; and
ringfeed services (one worker per core) on the folder and on the packed file.
Reported: images/s (median over rounds), ratios of medians and medians of the
rounds' own ratios against contenders of the same run, images/s per core next
to FFCV's published per-vCPU figure, and the share of decode time that DCT
downscaling saves on the boxes the crop draws. ``--quick`` (a smoke run:
200 JPEGs, batch 32, ringfeed and the limit on one worker each, short rounds)
says nothing about speed.

    .venv/bin/python benchmarks/images.py [--quick] [--rounds N] [--seconds S] [--images N]
                                          [--batch-size N] [--data-dir DIR] [--out DIR | --write-results]
"""

from __future__ import annotations

from __future__ import annotations

import argparse
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import benchlib
from benchlib import log
from image_contenders import (AUGMENT, DTYPES, RRC_RATIO, RRC_SCALE, SIZE, Contender, PillowDataset, TorchLoader,
                              TorchvisionDataset, keras_reference, plural, tf_data, torchvision_missing)
from image_ringfeed import InProcessLimit, Ringfeed, dct_saving, ringfeed_services
from image_set import DEFAULT_DATA_DIR, listing, make_data

BATCH = 128  # images per batch of a full run
KERNEL_TARGET, TF_TARGET, DATALOADER_TARGET = 0.9, 1.3, 2.0
# FFCV's ImageNet figure: decode + RandomResizedCrop(224) + flip, 31,278 images/s on 96 vCPUs.
FFCV = {"images_per_s": 31278, "vcpus": 96, "per_vcpu": 31278 / 96,
        "what": "decode + RandomResizedCrop(224) + flip, 96 vCPUs (FFCV's published figure)"}


def settle(limit_s: float) -> float:
    """Wait, at most ``limit_s``, until this process and its children are idle: a loader refills
    its buffers after its round (a DataLoader's 2 batches per worker, a feed's prefetch), which
    would take the cores from the loader timed next. Returns the seconds waited."""
    start = time.monotonic()
    _, before = benchlib.cpu_snapshot()
    while time.monotonic() - start < limit_s:
        time.sleep(0.1)
        _, now = benchlib.cpu_snapshot()
        if now - before < 0.02:  # under a fifth of a core over the last 0.1 s
            break
        before = now
    return time.monotonic() - start


# -- results ---------------------------------------------------------------------------------

def summarize(contenders: list[Contender], cores: int) -> list[dict]:
    rows = []
    for c in contenders:
        rate = benchlib.median(r["images_per_s"] for r in c.rounds)
        pixel_bytes = SIZE * SIZE * 3 * (4 if c.dtype == "float32" else 1)
        rows.append({"name": c.name, "label": c.label, "group": c.group, "kind": c.kind, "dtype": c.dtype,
                     "workers": c.workers, "delivered": c.delivered, "median_images_per_s": rate,
                     "median_mb_per_s": rate * pixel_bytes / 1e6, "images_per_s_per_core": rate / cores,
                     "rounds": c.rounds})
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        reference = by_name.get("tf.data" if row["dtype"] == "float32" else "tf.data-uint8", by_name["tf.data"])
        row["ratio_to_tf_data"] = benchlib.ratio(row["median_images_per_s"], reference["median_images_per_s"])
    return rows


def compare(contenders: list[Contender], what: str, name: str, reference: str | None, target: float | None) -> dict:
    """``name``'s median images/s over ``reference``'s, and the median of the rounds' own ratios."""
    by_name = {c.name: c for c in contenders}
    row = {"what": what, "contender": name, "reference": reference, "target": target, "ratio": None,
           "median_round_ratio": None, "met": None}
    if name in by_name and reference in by_name:
        mine = [r["images_per_s"] for r in by_name[name].rounds]
        theirs = [r["images_per_s"] for r in by_name[reference].rounds]
        row["ratio"], row["median_round_ratio"] = benchlib.same_run_ratios(mine, theirs)
        row["met"] = None if target is None else row["ratio"] >= target
    return row


def comparisons(contenders: list[Contender]) -> list[dict]:
    rows = []
    for dtype in DTYPES:
        suffix = "" if dtype == "float32" else "-uint8"
        loaders = [c for c in contenders if c.kind == "dataloader" and c.dtype == dtype]
        best = max(loaders, key=lambda c: benchlib.median(r["images_per_s"] for r in c.rounds)).name \
            if loaders else None
        packed = f"ringfeed-packed{suffix}"
        rows += [compare(contenders, f"ringfeed packed vs the in-process limit, {dtype}", packed,
                         f"in-process-limit{suffix}", KERNEL_TARGET),
                 compare(contenders, f"ringfeed packed vs tf.data, {dtype}", packed, f"tf.data{suffix}", TF_TARGET),
                 compare(contenders, f"ringfeed packed vs the best PyTorch DataLoader setup, {dtype}", packed, best,
                         DATALOADER_TARGET),
                 compare(contenders, f"ringfeed folder vs the in-process limit, {dtype}", f"ringfeed-folder{suffix}",
                         f"in-process-limit{suffix}", None)]
    return rows


def per_core(rows: list[dict], cores: int) -> dict:
    """ringfeed's images/s per core next to FFCV's published per-vCPU figure."""
    by_name = {r["name"]: r for r in rows}
    out = {"ffcv": FFCV, "cores": cores}
    for name in ("ringfeed-packed", "ringfeed-packed-uint8", "in-process-limit", "in-process-limit-uint8"):
        if name in by_name:
            rate = by_name[name]["images_per_s_per_core"]
            out[name] = {"images_per_s_per_core": rate, "ratio_to_ffcv_per_vcpu": rate / FFCV["per_vcpu"]}
    return out


def plot(rows: list[dict], skipped: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, cores_ax) = plt.subplots(1, 2, figsize=(16, 6.5), gridspec_kw={"width_ratios": [3, 2]},
                                         layout="constrained")
    ordered = sorted(rows, key=lambda r: r["median_images_per_s"])
    medians = [r["median_images_per_s"] for r in ordered]
    lows = [m - min(x["images_per_s"] for x in r["rounds"]) for m, r in zip(medians, ordered)]
    highs = [max(x["images_per_s"] for x in r["rounds"]) - m for m, r in zip(medians, ordered)]
    palette = {"ringfeed": "tab:orange", "limit": "tab:green", "peer": "tab:blue"}
    colors = [palette[r["group"]] for r in ordered]
    bars.barh([r["label"] for r in ordered], medians, xerr=[lows, highs], color=colors, capsize=3)
    for y, (m, high, r) in enumerate(zip(medians, highs, ordered)):
        bars.text(m + high, y, f"  {r['ratio_to_tf_data']:.2f}x", va="center", fontsize=8)
    bars.set_xlabel("images/s (median; whiskers: min-max over rounds; label: x tf.data of the same dtype)")
    bars.tick_params(axis="y", labelsize=7)
    if skipped:
        bars.set_title("skipped: " + ", ".join(s["name"] for s in skipped), fontsize=8)
    per = sorted(rows, key=lambda r: r["images_per_s_per_core"])
    cores_ax.barh([r["name"] for r in per], [r["images_per_s_per_core"] for r in per],
                  color=[palette[r["group"]] for r in per])
    cores_ax.axvline(FFCV["per_vcpu"], color="gray", linestyle="--",
                     label=f"FFCV, {FFCV['per_vcpu']:.0f} per vCPU (published, 96 vCPUs, no normalize)")
    cores_ax.set_xlabel("images/s per core (median)")
    cores_ax.tick_params(axis="y", labelsize=7)
    cores_ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)



# -- the run ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What a full or a quick run does: sizes, workers, and the untimed parts of each round."""

    seconds: float  # timed per contender per round
    images: int  # JPEGs in the data set
    batch: int
    cores: int
    workers: int  # ringfeed's workers and the limit's processes
    prefetch: int  # batches in flight per feed
    slots: int
    warmup: int  # untimed batches per round
    settle_s: float  # the most a round waits for the loader timed before it to go idle


def parse_args() -> argparse.Namespace:
    p = benchlib.parser(__doc__.split("\n\n")[0], rounds=5, quick_rounds=2)
    p.add_argument("--seconds", type=float, help="timed seconds per contender per round (default 4, 0.1 quick)")
    p.add_argument("--images", type=int, help="JPEGs to generate (default 5000, 200 quick)")
    p.add_argument("--batch-size", type=int, help=f"images per batch (default {BATCH}, 32 quick)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help=f"where the generated JPEGs and their pack are cached (default {DEFAULT_DATA_DIR})")
    args = benchlib.parse(p)
    args.images = args.images or (200 if args.quick else 5000)
    args.batch_size = args.batch_size or (32 if args.quick else BATCH)
    if not 1 <= args.batch_size <= args.images:
        p.error(f"--batch-size must be between 1 and the number of images, {args.images}")
    return args


def plan(args: argparse.Namespace) -> Plan:
    cores = os.cpu_count() or 1
    # ringfeed's workers and the limit's processes: one per core; one in a quick run, whose
    # numbers mean nothing and whose time goes mostly to starting processes
    workers = 1 if args.quick else cores
    prefetch = max(4, 2 * workers)  # two per worker
    # Untimed batches per round: more than a feed's prefetch and a DataLoader's 2 per worker,
    # which fill while the loader waits its turn.
    warmup = 1 if args.quick else prefetch + cores + 2
    return Plan(seconds=args.seconds if args.seconds is not None else (0.1 if args.quick else 4.0),
                images=args.images, batch=args.batch_size, cores=cores, workers=workers, prefetch=prefetch,
                slots=4 * prefetch, warmup=warmup, settle_s=0.0 if args.quick else 20.0)


def header(args: argparse.Namespace, run: Plan, data: dict) -> dict:
    result = benchlib.header("images", args, images=run.images, batch_size=run.batch, size=SIZE,
                             ringfeed_workers=run.workers, seconds_per_round=run.seconds,
                             warmup_batches_per_round=run.warmup, settle_s=run.settle_s, augment=AUGMENT,
                             rrc_scale=list(RRC_SCALE), rrc_ratio=list(RRC_RATIO), feed_prefetch=run.prefetch,
                             slots=run.slots, data={k: v for k, v in data.items() if k not in ("folder", "pack")},
                             data_dir=str(args.data_dir))
    result["versions"].update({name: benchlib._version(*dists) for name, dists in (
        ("pillow", ("pillow",)), ("simplejpeg", ("simplejpeg",)), ("torchvision", ("torchvision",)),
        ("scikit_image", ("scikit-image",)), ("scikit_learn", ("scikit-learn",)))})
    return result


def torch_contenders(paths, labels, run: Plan) -> tuple[list[Contender], list[dict]]:
    """The PyTorch DataLoaders that can run here (torchvision's, then Pillow's), and those skipped."""
    skipped, forking = [], []
    reason = benchlib.torch_missing()
    vision = reason or torchvision_missing()
    pool = plural(run.cores, "worker")  # one per core
    for dtype in DTYPES:
        suffix = "" if dtype == "float32" else "-uint8"
        if vision:
            skipped.append({"name": f"torch-torchvision{suffix}", "reason": vision})
        else:
            forking.append(TorchLoader(f"torch-torchvision{suffix}", f"PyTorch DataLoader, torchvision decode_jpeg + "
                                       f"v2, {pool}, {dtype}", dtype, run.batch,
                                       TorchvisionDataset(paths, labels, dtype), run.cores))
    for dtype in DTYPES:
        suffix = "" if dtype == "float32" else "-uint8"
        if reason:
            skipped.append({"name": f"torch-pillow{suffix}", "reason": reason})
        else:
            forking.append(TorchLoader(f"torch-pillow{suffix}", f"PyTorch DataLoader, Pillow, {pool}, {dtype}",
                                       dtype, run.batch, PillowDataset(paths, labels, dtype), run.cores))
    for s in skipped:
        log(f"skipping {s['name']}: {s['reason']}")
    return forking, skipped


def run_rounds(contenders: list[Contender], rounds: int, run: Plan) -> None:
    """Each round times every contender once, the order rotated by one each round, each once the
    loader timed before it has settled."""
    for r in range(rounds):
        shift = r % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            waited = settle(run.settle_s)
            with benchlib.OtherLoad() as load:
                measured = c.measure(run.seconds, run.warmup)
            measured.update(other_load=load.share, settled_s=round(waited, 2))
            c.rounds.append(measured)
            log(f"[round {r + 1}/{rounds}] {c.name:<26} {measured['images_per_s']:>9,.0f} images/s"
                f"  (other processes: {load.share:.0%} of the cores; settled {waited:.1f} s)")


def measure(run: Plan, rounds: int, data: dict, paths, labels, forking: list[Contender]) -> list[Contender]:
    """Start every contender, time them in rounds, stop them; the contenders in report order."""
    with ExitStack() as stack:
        # Forked workers first: no loader should inherit the others' threads.
        benchlib.start_all(stack, forking, run.warmup)
        limits = [InProcessLimit(data["pack"], dtype, run.batch, run.workers) for dtype in DTYPES]
        for c in limits:  # its processes start beside the services
            stack.callback(c.stop)
            c.launch()
        wanted = [(source, where, dtype) for source, where in (("folder", data["folder"]), ("packed", data["pack"]))
                  for dtype in DTYPES]
        endpoints = ringfeed_services(stack, wanted, run.batch, run.workers, run.slots)
        ringfeed = [Ringfeed(endpoint, source, dtype, run.batch, run.workers, run.prefetch)
                    for endpoint, (source, _, dtype) in zip(endpoints, wanted)]
        peers = [tf_data(paths, labels, dtype, run.batch) for dtype in DTYPES] \
            + [keras_reference(data["folder"], run.batch)]
        benchlib.start_all(stack, limits + peers + ringfeed, run.warmup)
        contenders = peers + forking + limits + ringfeed  # report order: peers, limit, ringfeed
        run_rounds(contenders, rounds, run)
    return contenders


def print_summary(result: dict) -> None:
    print(f"{'contender':<30}{'images/s':>10}{'per core':>10}{'x tf.data':>11}")
    for row in result["contenders"]:
        print(f"{row['name']:<30}{row['median_images_per_s']:>10,.0f}{row['images_per_s_per_core']:>10,.0f}"
              f"{row['ratio_to_tf_data']:>11.2f}")
    for s in result["skipped"]:
        print(f"{s['name']:<30} skipped: {s['reason']}")
    benchlib.print_comparisons(result["comparisons"])
    for name, value in result["per_core"].items():
        if isinstance(value, dict) and "images_per_s_per_core" in value:
            print(f"{name}: {value['images_per_s_per_core']:,.0f} images/s per core, "
                  f"{value['ratio_to_ffcv_per_vcpu']:.2f}x FFCV's {FFCV['per_vcpu']:.0f} per vCPU")
    dct = result["dct"]
    print(f"DCT downscaling: {dct['full_us_per_image']:.0f} -> {dct['scaled_us_per_image']:.0f} us per JPEG, "
          f"{dct['share_saved']:.1%} of the decode time saved (factors {dct['factors']})")


def main() -> None:
    args = parse_args()
    run = plan(args)
    data = make_data(args.data_dir, run.images)
    paths, labels = listing(data["folder"])
    dct = dct_saving(data["pack"], 32 if args.quick else 1024, 3 if args.quick else 9)
    log(f"DCT downscaling saves {dct['share_saved']:.1%} of the decode time "
        f"({dct['full_us_per_image']:.0f} -> {dct['scaled_us_per_image']:.0f} us a JPEG; factors {dct['factors']})")
    result = header(args, run, data)
    forking, skipped = torch_contenders(paths, labels, run)
    contenders = measure(run, args.rounds, data, paths, labels, forking)
    rows = summarize(contenders, run.cores)
    result.update(contenders=rows, skipped=skipped, comparisons=comparisons(contenders),
                  per_core=per_core(rows, run.cores), dct=dct)
    machine = result["machine"]
    benchlib.write_json(args.out / "images.json", result)
    plot(rows, skipped, args.out / "images.png",
         f"JPEGs -> RandomResizedCrop {SIZE}, flip (, normalize), batch {run.batch}; "
         f"{run.images:,} JPEGs of 256-512 px; {machine['cpu']}, {machine['cores']} cores; "
         f"median of {args.rounds} rounds")
    log(f"wrote {args.out / 'images.png'}")
    print_summary(result)


if __name__ == "__main__":
    main()
