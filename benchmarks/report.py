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

from report_sections import (delivery_section, fit_section, gpu_fit_section, images_section, machine_line,
                             remote_section, throughput_section, times)

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
SUMMARY_START, SUMMARY_END = "<!-- summary:start -->", "<!-- summary:end -->"


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


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
