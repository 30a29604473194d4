"""Turn the benchmark results into benchmarks/RESULTS.md's tables and the README's summary (markdown).

    .venv/bin/python benchmarks/report.py [--results DIR] [--write [--results-md PATH] [--readme PATH]]

Prints the tables; ``--write`` puts them between ``<!-- results:start -->`` and
``<!-- results:end -->`` in RESULTS.md, and a few headline ratios between
``<!-- summary:start -->`` and ``<!-- summary:end -->`` in the README, leaving
everything else in both as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
SUMMARY_START, SUMMARY_END = "<!-- summary:start -->", "<!-- summary:end -->"


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


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
    for skipped in result.get("skipped", []):
        lines.append(f"\n{skipped['name']} not measured: {skipped['reason']}.")
    png = results / "throughput.png"
    if png.exists():
        lines += ["", f"![Loader throughput]({Path(os.path.relpath(png, readme_dir)).as_posix()})"]
    return lines


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
    for skipped in result.get("skipped", []):
        lines.append(f"\n{skipped['name']} not measured: {skipped['reason']}.")
    png = results / "images.png"
    if png.exists():
        lines += ["", f"![Image files]({Path(os.path.relpath(png, readme_dir)).as_posix()})"]
    return lines


# Each results file: (the script that writes it, whether RESULTS.md needs it). The optional ones
# come from machines a session is not always lent: a GPU, more cores.
RESULTS = {"throughput": ("throughput", True), "fit": ("fit", True), "delivery": ("delivery", True),
           "remote-augment": ("remote", True), "remote-gather": ("remote", True),
           "gpu_fit": ("gpu_fit", False), "remote-augment-16cores": ("remote", False), "images": ("images", True)}


def load_all(results: Path) -> dict[str, dict | None]:
    """Every results file there, and None for each required one that is missing."""
    loaded = {name: load(results, name) for name in RESULTS}
    loaded = {name: r for name, r in loaded.items() if r or RESULTS[name][1]}
    if not any(loaded.values()):
        raise SystemExit(f"no results in {results}: run the benchmarks first")
    return loaded


def render(results: Path, readme_dir: Path) -> str:
    loaded = load_all(results)
    present = [r for r in loaded.values() if r]
    machines = {machine_line(r) for r in present}
    lines = [f"Measured on {' / '.join(sorted(machines))}. Every ratio compares loaders measured in the "
             "same run; absolute numbers move with other load on the machine, so each part says how busy "
             "other processes kept the cores."]
    if any(r["quick"] for r in present):
        lines.append("\n*Quick smoke-run numbers (`--quick`), not for comparison.*")
    sections = {"throughput": lambda r: throughput_section(r, results, readme_dir), "fit": fit_section,
                "gpu_fit": gpu_fit_section, "delivery": delivery_section, "remote-augment": remote_section,
                "remote-gather": remote_section, "remote-augment-16cores": remote_section,
                "images": lambda r: images_section(r, results, readme_dir)}
    for name, result in loaded.items():
        lines.append("")
        lines += sections[name](result) if result else \
            [f"({name}.json missing: run benchmarks/{RESULTS[name][0]}.py --write-results)"]
    lines += ["", "Reproduce (from the repository root; only `--write-results` updates `benchmarks/results/`, "
              "and without it or `--out DIR` a run writes to a temporary folder it names; `--quick` runs each "
              "in under a minute, and is never written there):", "", "```sh"]
    for name, result in loaded.items():
        script = RESULTS[name][0]
        flags = [f"--workload {name.split('-')[1]}"] if script == "remote" else []
        took = ""
        if result:
            flags = run_flags(result["command"])
            took = f"  # {result['duration_s'] / 60:.1f} min for the run above"
            if not RESULTS[name][1]:
                took += f", on {result['machine']['cores']} cores" + (
                    f" and an {result['settings']['gpu']}" if result["settings"].get("gpu") else "")
        written = f"remote-{name.split('-')[1]}" if script == "remote" else script
        if written != name:  # another machine's run of a script whose file this machine's run has
            flags += [f"--out /tmp/{name} && mv /tmp/{name}/{written}.json benchmarks/results/{name}.json"]
        elif "--quick" not in flags:  # without it a run writes to a temporary folder
            flags.append("--write-results")
        lines.append(" ".join([".venv/bin/python", f"benchmarks/{script}.py", *flags]) + took)
    lines += [".venv/bin/python benchmarks/report.py --write", "```"]
    return "\n".join(lines)


def _rows(rows: list[dict], *names: str) -> list[dict] | None:
    """The rows of those names, or None when a run lacks one (a quick or partial run)."""
    found = {row["name"]: row for row in rows}
    return [found[name] for name in names] if all(name in found for name in names) else None


def _ratio(a: dict, b: dict, key: str) -> str:
    return times(a[key] / b[key]) if a[key] and b[key] else "–"


def _throughput_headline(result: dict) -> str | None:
    rows = result["contenders"]
    found = _rows(rows, "ringfeed-generator-w2", "numba-all-cores")
    torch = [row for row in rows if row["name"].startswith("torch-") and row["median_samples_per_s"]]
    if not found or not torch:
        return None
    ours, kernel = found
    best_torch = max(torch, key=lambda row: row["median_samples_per_s"])
    return (f"Loader only, {result['machine']['cores']} cores: {times(ours['ratio_to_tf_data'])} tf.data, "
            f"{_ratio(ours, best_torch, 'median_samples_per_s')} the best PyTorch DataLoader, "
            f"{_ratio(ours, kernel, 'median_samples_per_s')} ringfeed's own kernel run in-process with nothing "
            "delivered.")


def _fit_headline(result: dict) -> str | None:
    ours = [row for row in result["inputs"] if row["name"].startswith("ringfeed") and row["ratio_to_ceiling"]]
    if not ours:
        return None
    best = max(ours, key=lambda row: row["ratio_to_ceiling"])
    line = (f"Keras `model.fit`, {result['machine']['cores']} cores: {times(best['ratio_to_ceiling'])} the model "
            f"alone on one in-memory batch, {times(best['ratio_to_tf_data'])} tf.data ({best['label']}).")
    comparisons = result.get("autotune", {}).get("comparisons")
    if comparisons:  # fit.py runs since workers = "auto" landed
        line += (" Autotuned workers against the best hand-picked count: "
                 + ", ".join(f"{times(c['ratio'])} ({c['what']})" for c in comparisons) + ".")
    return line


def _gpu_fit_headline(result: dict) -> str | None:
    found = _rows(result["inputs"], "ringfeed-torch-pinned-w8")
    if not found or not result["settings"].get("gpu"):
        return None
    return (f"Keras `model.fit` on a GPU ({result['settings']['gpu']}, torch backend): "
            f"{times(found[0]['ratio_to_ceiling'])} the model alone on a batch already on the device, "
            f"{times(found[0]['ratio_to_torch_dataloader'])} the PyTorch DataLoader with `pin_memory`.")


def _remote_headline(result: dict) -> str | None:
    found = _rows(result["contenders"], "ringfeed tcp frames", "ringfeed shm (same server)")
    if not found:
        return None
    return (f"Over loopback TCP, {result['machine']['cores']} cores: {times(found[0]['ratio_to_raw_pyzmq'])} raw "
            f"pyzmq; the same server's shared-memory path {times(found[1]['ratio_to_raw_pyzmq'])}.")


def _images_headline(result: dict) -> str | None:
    ratios = {c["what"]: c["ratio"] for c in result["comparisons"]}
    tf, torch = (ratios.get(f"ringfeed packed vs {what}, float32") for what in
                 ("tf.data", "the best PyTorch DataLoader setup"))
    if tf is None or torch is None:
        return None
    return (f"JPEG files, packed, {result['machine']['cores']} cores: {times(tf)} tf.data, {times(torch)} the best "
            "PyTorch DataLoader.")


def _delivery_headline(result: dict) -> str | None:
    routes = result["routes"]
    return (f"Delivery: {sum(row['meets_targets'] for row in routes)} of {len(routes)} routes meet the targets "
            "for batches/s and client CPU per batch.")


HEADLINES = {"throughput": _throughput_headline, "fit": _fit_headline, "gpu_fit": _gpu_fit_headline,
             "remote-augment": _remote_headline, "images": _images_headline, "delivery": _delivery_headline}


def headline_lines(loaded: dict[str, dict | None]) -> list[str]:
    """A bullet of headline ratios per benchmark that has results, for the README."""
    lines = [HEADLINES[name](loaded[name]) for name in HEADLINES if loaded.get(name)]
    return [f"- {line}" for line in lines if line]


def replace_block(path: Path, start_mark: str, end_mark: str, block: str) -> None:
    """Put ``block`` between the two marks in ``path``, leaving everything else as it is."""
    text = path.read_text()
    start, end = text.find(start_mark), text.find(end_mark)
    if start < 0 or end < start:
        raise SystemExit(f"{path} has no {start_mark} ... {end_mark} block to replace")
    path.write_text(text[:start + len(start_mark)] + "\n" + block + "\n" + text[end:])
    print(f"updated {path}", file=sys.stderr)


def run_flags(command: str) -> list[str]:
    """The flags a result was made with, less where it was written."""
    args, flags = shlex.split(command)[2:], []
    while args:
        arg = args.pop(0)
        if arg == "--out":
            args = args[1:]
        elif not arg.startswith("--out=") and arg != "--write-results":
            flags.append(shlex.quote(arg))
    return flags


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results",
                   help="folder with throughput.json, fit.json, delivery.json (default benchmarks/results)")
    p.add_argument("--write", action="store_true",
                   help="replace the results block of RESULTS.md and the summary block of the README")
    p.add_argument("--results-md", type=Path, default=REPO / "benchmarks" / "RESULTS.md",
                   help="the full tables' file (default benchmarks/RESULTS.md)")
    p.add_argument("--readme", type=Path, default=REPO / "README.md",
                   help="the README whose summary to update (default README.md)")
    args = p.parse_args()
    section = render(args.results.resolve(), args.results_md.resolve().parent)
    if args.write:
        link = Path(os.path.relpath(args.results_md.resolve(), args.readme.resolve().parent)).as_posix()
        summary = "\n".join(headline_lines(load_all(args.results.resolve()))
                            + ["", f"Same-run ratios, medians of several rounds; tables, machines and versions: "
                                   f"[{link}]({link})."])
        replace_block(args.results_md, START, END, section)
        replace_block(args.readme, SUMMARY_START, SUMMARY_END, summary)
    else:
        print(section)


if __name__ == "__main__":
    main()
