"""report.py's RESULTS.md sections: one per benchmark's results, each a paragraph saying what was
measured and a markdown table, with the cell formats they share.
"""

from __future__ import annotations

import os
from pathlib import Path


def skipped_and_plot(result: dict, png: Path, alt: str, readme_dir: Path) -> list[str]:
    """A section's closing lines: each contender it could not measure, and its plot if there is one."""
    lines = [f"\n{skipped['name']} not measured: {skipped['reason']}." for skipped in result.get("skipped", [])]
    if png.exists():
        lines += ["", f"![{alt}]({Path(os.path.relpath(png, readme_dir)).as_posix()})"]
    return lines


def machine_line(result: dict) -> str:
    m, v = result["machine"], result["versions"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("numpy", "numba", "tensorflow", "keras", "pyzmq", "torch") if v.get(k))
    gpu = result["settings"].get("gpu") or m.get("gpu") or "no GPU"
    return f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']:g} GiB RAM, {gpu}; Python {v['python']}, {libs}"


def run_line(result: dict) -> str:
    """Which ringfeed code ran, and when."""
    src = result.get("ringfeed_source", {})
    code = f"ringfeed {src['commit'][:10]}" if src.get("commit") else "ringfeed"
    return f"{code}{' with local changes' if src.get('dirty') else ''}, {result['created'][:10]}"


def num(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def share(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def other_load_line(rows: list[dict]) -> str:
    """How busy the rest of the machine was during the timed rounds (older results lack it)."""
    loads = sorted(r["other_load"] for row in rows for r in row["rounds"] if "other_load" in r)
    if not loads:
        return ""
    return (f" Other processes kept {loads[len(loads) // 2]:.0%} of the cores busy in the median round "
            f"(at most {loads[-1]:.0%}).")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def throughput_section(result: dict, results: Path, readme_dir: Path) -> list[str]:
    s = result["settings"]
    lines = [f"**Loader throughput** (`benchmarks/throughput.py`): {s['samples']:,} × 64×64×3 uint8, random crop "
             f"56, flip, normalize to float32, batch {s['batch_size']}; the consumer takes each batch and drops it. "
             f"Median of {result['rounds']} interleaved rounds of {s['seconds_per_round']:g} s per loader "
             f"({run_line(result)})."
             + other_load_line(result["contenders"]), ""]
    lines += table(["loader", "samples/s", "MB/s", "vs tf.data"],
                   [[r["label"], num(r["median_samples_per_s"]), num(r["median_mb_per_s"]),
                     times(r["ratio_to_tf_data"])] for r in result["contenders"]])
    lines += ["", "The numba rows run ringfeed's own kernels in the consumer's process, with nothing delivered: "
              "the compute limit of this machine. They write every batch into one buffer, aligned as a slot is, "
              "that stays in cache. ringfeed's workers write into slots in turn with streaming stores; the "
              "\"plain stores\" row is the same service with `streaming_stores = false`. Keras PyDataset and the "
              "per-sample PyTorch DataLoader run the classic generator's per-sample numpy code; the batch-level "
              "DataLoader runs ringfeed's kernels."]
    return lines + skipped_and_plot(result, results / "throughput.png", "Loader throughput", readme_dir)


def fit_section(result: dict) -> list[str]:
    s = result["settings"]
    lines = [f"**Keras `model.fit`** (`benchmarks/fit.py`): {s['model']}, {s['steps']} timed steps of "
             f"{s['batch_size']} per fit, median of {result['rounds']} rounds ({run_line(result)}). "
             "The ceiling is the model alone on one in-memory batch; the generator path is that batch "
             "yielded by a Python generator, which costs Keras' per-step Python for every generator input, "
             "ringfeed's included; the generator ring yields distinct in-memory batches in turn, as a ring of "
             "slots would, no longer hot in cache. Ratios are of medians; since this machine's speed drifts "
             "between rounds, \"per round\" is also the median of each round's own ratio to the ceiling. "
             "Input stall: share of the time the input reader waited for a batch "
             "(ringfeed: `feed.stats[\"wait_s\"]`; classic generator: time inside its `next()`, where it "
             "computes); tf.data is read inside the compiled step, where no wait is visible (–)."
             + other_load_line(result["inputs"]), ""]
    lines += table(["input", "steps/s", "vs ceiling", "vs ceiling, per round", "vs generator path", "vs tf.data",
                    "input stall"],
                   [[r["label"], num(r["median_steps_per_s"], 1), times(r["ratio_to_ceiling"]),
                     times(r.get("round_ratio_to_ceiling")), times(r["ratio_to_generator_path"]),
                     times(r["ratio_to_tf_data"]),
                     share(r["median_stall_share"])] for r in result["inputs"]])
    return lines


def gpu_fit_section(result: dict) -> list[str]:
    s = result["settings"]
    where = f"on a GPU** (`benchmarks/gpu_fit.py`, {s['gpu']}" if s["gpu"] else \
        "on the CPU** (`benchmarks/gpu_fit.py`, no CUDA device"
    lines = [f"**Keras `model.fit` on the torch backend, {where}, Keras {result['versions']['keras']}, "
             f"{result['machine']['cores']} cores): the same model and "
             f"workload, {s['steps']} timed steps of {s['batch_size']} per fit, median of {result['rounds']} rounds "
             f"({run_line(result)}). The ceiling is the model alone on one batch already on the device. On this "
             "backend Keras reads the input in the training loop itself, so every wait for a batch idles the GPU; "
             "input stall is the time inside the input's `next()` (ringfeed: `feed.stats[\"wait_s\"]`). "
             "Keras copies every numpy input on the host (`np.array`) before sending it to the device, which "
             "`torch_generator()` avoids; `pin_memory` page-locks the ring so the copy engine reads each slot "
             "directly." + other_load_line(result["inputs"]), ""]
    lines += table(["input", "steps/s", "vs ceiling", "vs ceiling, per round", "vs PyTorch DataLoader",
                    "input stall"],
                   [[r["label"], num(r["median_steps_per_s"], 1), times(r["ratio_to_ceiling"]),
                     times(r["round_ratio_to_ceiling"]), times(r["ratio_to_torch_dataloader"]),
                     share(r["median_stall_share"])] for r in result["inputs"]])
    return lines


def delivery_section(result: dict) -> list[str]:
    s, t = result["settings"], result["settings"]["targets"]
    lines = [f"**Delivery overhead** (`benchmarks/delivery.py`): ({s['samples']:,}, {s['features']}) float32, "
             f"no augmentation, batch {s['batch_size']}, so the path itself sets the rate; median of "
             f"{result['rounds']} rounds ({run_line(result)}). Targets: ≥ {t['batches_per_s']:,} batches/s and ≤ "
             f"{t['client_cpu_us_per_batch']:g} µs of client CPU per batch." + other_load_line(result["routes"]), ""]
    lines += table(["route", "batches/s", "client CPU µs/batch", "broker CPU µs/batch", "workers CPU µs/batch",
                    "targets"],
                   [[r["label"], num(r["median_batches_per_s"]), num(r["median_client_cpu_us_per_batch"], 1),
                     num(r["median_broker_cpu_us_per_batch"], 1), num(r["median_workers_cpu_us_per_batch"], 1),
                     "met" if r["meets_targets"] else "missed"] for r in result["routes"]])
    return lines


def remote_section(result: dict) -> list[str]:
    s = result["settings"]
    what = ("the standard workload (crop, flip, normalize)" if s["workload"] == "augment" else
            "float32 samples already 56×56×3, no augmentation (workers only gather)")
    lines = [f"**Remote delivery, {s['workload']}, {result['machine']['cores']} cores** "
             f"(`benchmarks/remote.py --workload {s['workload']}`): "
             f"loopback TCP, batch {s['batch_size']} of {what}, {s['batch_bytes'] / 1e6:.1f} MB a batch; "
             f"raw pyzmq pushes one preallocated buffer with `copy=False`, or 16 in turn, as a ring would"
             + (", or makes each batch on one core before sending it, as a hand-written loader would"
                if any("ratio_to_raw_sender_making_batches" in r for r in result["contenders"]) else "")
             + "; "
             f"median of {result['rounds']} rounds ({run_line(result)}). "
             f"Target: ringfeed TCP ≥ {s['targets']['tcp_vs_raw']:g}× raw.", ""]
    lines += table(["contender", "MB/s", "vs raw pyzmq", "vs raw, 16 buffers", "vs raw, sender makes batches"],
                   [[r["name"], num(r["median_mb_per_s"]), times(r["ratio_to_raw_pyzmq"]),
                     times(r["ratio_to_raw_ring_buffers"]), times(r.get("ratio_to_raw_sender_making_batches"))]
                    for r in result["contenders"]])
    return lines


def target_cell(c: dict) -> str:
    if c["target"] is None:
        return "–"
    return f"≥ {c['target']:g}× ({'not measured' if c['met'] is None else 'met' if c['met'] else 'missed'})"


def images_section(result: dict, results: Path, readme_dir: Path) -> list[str]:
    s, v, rows = result["settings"], result["versions"], result["contenders"]
    photos = s["data"].get("photographs", [])
    shipped = " and scikit-image" if any(p.startswith("skimage/") for p in photos) else ""
    named = (("pillow", "Pillow"), ("simplejpeg", "simplejpeg"), ("torchvision", "torchvision"),
             ("scikit_image", "scikit-image"))
    libs = ", ".join(f"{name} {v[key]}" for key, name in named if v.get(key))
    lines = [f"**Image files** (`benchmarks/images.py`): {s['images']:,} JPEGs (quality {s['data']['quality']}, "
             f"sides {s['data']['sides'][0]}–{s['data']['sides'][1]} px, cut from {len(photos)} photographs that "
             f"scikit-learn{shipped} ship by random crops, rescales and colour shifts, {s['data']['classes']} class "
             f"folders) and the same folder packed; decode, RandomResizedCrop({s['size']}, scale "
             f"{tuple(s['rrc_scale'])}), flip, normalize to float32, or uint8 without normalize, batch "
             f"{s['batch_size']}, NHWC; median of "
             f"{result['rounds']} interleaved rounds of {s['seconds_per_round']:g} s per loader, each after "
             f"{s['warmup_batches_per_round']} untimed batches ({run_line(result)}; {libs})."
             + other_load_line(rows), ""]
    lines += table(["loader", "images/s", "images/s per core", "MB/s", "vs tf.data"],
                   [[r["label"], num(r["median_images_per_s"]), num(r["images_per_s_per_core"]),
                     num(r["median_mb_per_s"]), times(r["ratio_to_tf_data"])] for r in rows])
    lines += ["", "tf.data decodes only the crop window (`decode_and_crop_jpeg`) and resizes with antialiasing; the "
              "Pillow DataLoader decodes each image whole and resizes its box with `resize(box=...)`; Keras' "
              "`image_dataset_from_directory` only decodes and resizes, a reference. The in-process limit runs "
              "ringfeed's own decode and kernels (`BatchMaker`) on the packed file in one process per core, with "
              "nothing delivered. \"vs tf.data\" compares with tf.data of the same output dtype.", ""]
    lines += table(["comparison", "ratio of medians", "per round", "target"],
                   [[c["what"], times(c["ratio"]), times(c["median_round_ratio"]),
                     target_cell(c)] for c in result["comparisons"]])
    per, ffcv = result["per_core"], result["per_core"]["ffcv"]
    shown = [f"{name} {per[name]['images_per_s_per_core']:,.0f} ({per[name]['ratio_to_ffcv_per_vcpu']:.2f}×)"
             for name in ("ringfeed-packed", "ringfeed-packed-uint8") if name in per]
    if shown:
        lines += ["", f"Per core: {', '.join(shown)} images/s, against FFCV's published {ffcv['per_vcpu']:.0f} "
                  f"per vCPU ({ffcv['images_per_s']:,} images/s for {ffcv['what'].split(', ')[0]} on "
                  f"{ffcv['vcpus']} vCPUs; other images, another machine)."]
    d = result["dct"]
    factors = ", ".join(f"1/{f}: {n}" for f, n in d["factors"].items() if n)
    lines += ["", f"DCT downscaling: decoding {d['samples']:,} sampled JPEGs with the `min_size` their "
              f"RandomResizedCrop boxes allow took {d['scaled_us_per_image']:,.0f} µs each against "
              f"{d['full_us_per_image']:,.0f} µs at full size (one thread's CPU time, median of {d['rounds']} "
              f"rounds): {d['share_saved']:.1%} of the decode time saved ({d['median_round_share_saved']:.1%} per "
              f"round); scales used: {factors}."]
    return lines + skipped_and_plot(result, results / "images.png", "Image files", readme_dir)
