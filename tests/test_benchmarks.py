"""The benchmark scripts run end to end (``--quick``) and write complete, positive results.

Each script runs once per module, as a subprocess from the repository root,
writing into a temporary folder so the committed results stay as they are
(delivery.py with no ``--out``: the folder it picks itself). The runs the
selected tests need start together when the first of them is wanted, two at a
time (``PARALLEL_RUNS``): much of a quick run is timed phases of fixed length,
which overlap well, and these tests check only that every result is there and
positive, never how fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
QUICK_ROUNDS = 2
CORES = os.cpu_count() or 1
PARALLEL_RUNS = 2
RUN_TIMEOUT_S = 300  # the slowest quick run, fit.py, takes about half of it beside another run


def worker_counts() -> list[int]:
    return sorted({CORES} | {2 ** k for k in range(CORES.bit_length()) if 2 ** k < CORES})


def run_script(name: str, out: Path, *extra: str, timeout_s: float = 150) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """images.py's own folder: its data is made afresh there, and its results stay apart."""
    return tmp_path_factory.mktemp("images")


def quick_arguments(script: str, out: Path, image_folder: Path) -> list[str]:
    if script == "delivery":
        return ["--quick"]  # no --out: see the delivery fixture
    if script == "remote":
        return ["--quick", "--workload", "gather", "--out", str(out)]
    if script == "images":
        return ["--quick", "--out", str(image_folder / "out"), "--data-dir", str(image_folder / "data")]
    return ["--quick", "--out", str(out)]


def wanted_runs(request) -> list[str]:
    """The scripts the selected tests of this module read the results of, in the order they come."""
    needed = set()
    for item in request.session.items:
        if item.module is request.module:
            needed |= set(item.fixturenames)
    if "torch_fit" in needed and importlib.util.find_spec("torch") is not None:
        needed.add("gpu_fit")
    return [script for script in SCRIPTS if script in needed]


COMMITTED_DELIVERY = ROOT / "benchmarks" / "results" / "delivery.json"


def mtime_ns(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


@pytest.fixture(scope="module")
def committed_delivery_before() -> int | None:
    """The committed delivery results' mtime before any quick run has started."""
    return mtime_ns(COMMITTED_DELIVERY)


@pytest.fixture(scope="module")
def runs(request, out, image_folder, committed_delivery_before):
    """Every wanted quick run, started now, ``PARALLEL_RUNS`` at a time: its ``Future``."""
    with ThreadPoolExecutor(PARALLEL_RUNS) as pool:
        futures = {script: pool.submit(run_script, f"{script}.py", out, *quick_arguments(script, out, image_folder),
                                       timeout_s=RUN_TIMEOUT_S)
                   for script in wanted_runs(request)}
        yield futures
        for future in futures.values():
            future.cancel()  # those no test waited for, once a test failed early


def finished(runs: dict[str, Future], script: str) -> subprocess.CompletedProcess:
    return runs[script].result(timeout=len(SCRIPTS) * RUN_TIMEOUT_S)  # at worst, queued behind every other


def quick_result(runs: dict[str, Future], script: str, folder: Path) -> dict:
    finished(runs, script)
    result = json.loads((folder / f"{script}.json").read_text())
    assert result["quick"] is True and result["rounds"] == QUICK_ROUNDS
    assert result["machine"]["cores"] == CORES and result["versions"]["numba"]
    return result


@pytest.fixture(scope="module")
def throughput(runs, out) -> dict:
    return quick_result(runs, "throughput", out)


@pytest.fixture(scope="module")
def fit(runs, out) -> dict:
    return quick_result(runs, "fit", out)


@pytest.fixture(scope="module")
def gpu_fit(runs, out) -> dict:
    pytest.importorskip("torch")
    return quick_result(runs, "gpu_fit", out)


@pytest.fixture(scope="module")
def torch_fit(request) -> dict | None:
    """gpu_fit's results if PyTorch is here, else None: the report renders with or without them."""
    return request.getfixturevalue("gpu_fit") if importlib.util.find_spec("torch") is not None else None


@pytest.fixture(scope="module")
def delivery(runs, out, committed_delivery_before) -> dict:
    """A quick run without ``--out``: it writes into a temporary folder and says which, leaving
    the committed results alone; its result is copied beside the others' for the report."""
    done = finished(runs, "delivery")
    folder = Path(re.search(r"^writing the results to (\S+) ", done.stderr, re.M).group(1))
    try:
        assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("ringfeed-delivery-")
        shutil.copy(folder / "delivery.json", out / "delivery.json")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert mtime_ns(COMMITTED_DELIVERY) == committed_delivery_before
    result = json.loads((out / "delivery.json").read_text())
    assert result["quick"] is True and result["rounds"] == QUICK_ROUNDS
    return result


SCRIPTS = ("throughput", "fit", "gpu_fit", "delivery", "remote", "images")


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_runs_never_write_the_committed_results(script):
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick",
                              "--write-results"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--quick --write-results: quick results are not committed" in refused.stderr


def test_out_and_write_results_exclude_each_other():
    both = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--out", "x.json",
                           "--write-results"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


@pytest.fixture(scope="module")
def remote(runs, out) -> dict:
    finished(runs, "remote")
    return json.loads((out / "remote-gather.json").read_text())


def ringfeed_names(*kinds: str) -> set[str]:
    return {f"ringfeed-{kind}-w{w}" for kind in kinds for w in worker_counts()}


def test_throughput_measures_every_contender(throughput, out):
    torch_names = {"torch-per-sample", "torch-numba-batch"}
    expected = {"classic-generator", "numba-1-thread", "numba-all-cores", "tf.data", "keras-pydataset"} \
        | ringfeed_names("generator", "tf-dataset") \
        | {f"ringfeed-{kind}-generator-w{CORES}" for kind in ("private", "plain-stores", "multi-field", "python-op")}
    measured = {row["name"]: row for row in throughput["contenders"]}
    skipped = {row["name"] for row in throughput["skipped"]}
    if importlib.util.find_spec("torch") is None:
        assert skipped == torch_names and not torch_names & set(measured)
    else:
        expected |= torch_names
        assert not skipped
    assert set(measured) == expected
    for row in measured.values():
        assert row["median_samples_per_s"] > 0 and row["median_mb_per_s"] > 0 and row["ratio_to_tf_data"] > 0
        assert len(row["rounds"]) == QUICK_ROUNDS
        assert all(r["samples_per_s"] > 0 and r["batches"] > 0 for r in row["rounds"])
        x = row["delivered"].get("x", row["delivered"].get("x.features"))
        assert x == [[256, 56, 56, 3], "float32"], row["name"]
    assert measured["tf.data"]["ratio_to_tf_data"] == pytest.approx(1.0)
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_throughput_compares_fields_python_op_and_per_sample_cost(throughput):
    multi = next(r for r in throughput["contenders"] if r["name"] == f"ringfeed-multi-field-generator-w{CORES}")
    assert multi["delivered"] == {"x.features": [[256, 56, 56, 3], "float32"], "x.meta": [[256, 16], "float32"],
                                  "y": [[256], "int64"], "w": [[256], "float32"]}
    comparisons = {c["contender"]: c for c in throughput["comparisons"]}
    assert set(comparisons) == {f"ringfeed-{kind}-w{CORES}" for kind in ("multi-field-generator", "generator",
                                                                         "python-op-generator")}
    torch = importlib.util.find_spec("torch") is not None
    for name, c in comparisons.items():
        if c["reference"] == "torch-per-sample" and not torch:
            assert c["ratio"] is None
        else:  # a positive number: how fast is for the full run to say, never for a test
            assert c["ratio"] > 0 and c["median_round_ratio"] > 0 and c["target"] > 0
    cost = throughput["per_sample_cost"]
    rows = {row["name"]: row for row in cost["rows"]}
    assert set(rows) == {"per-sample-numba", "per-sample-python-op", "per-sample-python-fn"}
    for row in rows.values():
        assert row["median_us_per_sample"] > 0 and len(row["rounds"]) == QUICK_ROUNDS
        assert row["delivered"] == {"x": [[256, 56, 56, 3], "float32"]}
    assert cost["python_op_over_numba"] > 0


def test_fit_measures_every_input(fit):
    untimed = {"ceiling", "generator-path", "generator-ring", "tf.data"}
    expected = untimed | {"classic-generator"} | ringfeed_names("generator", "tf-dataset")
    rows = {row["name"]: row for row in fit["inputs"]}
    assert set(rows) == expected
    for row in rows.values():
        assert row["median_steps_per_s"] > 0 and row["ratio_to_ceiling"] > 0 and row["ratio_to_tf_data"] > 0
        assert row["ratio_to_generator_path"] > 0 and row["round_ratio_to_ceiling"] > 0
        assert len(row["rounds"]) == QUICK_ROUNDS
    assert rows["ceiling"]["ratio_to_ceiling"] == rows["ceiling"]["round_ratio_to_ceiling"] == pytest.approx(1.0)
    for name in expected - untimed:  # generator and feed readers are timed
        assert 0 <= rows[name]["median_stall_share"] <= 1
    assert rows["tf.data"]["median_stall_share"] is None


def test_gpu_fit_trains_on_keras_torch_backend_from_every_input(gpu_fit):
    import torch

    cuda = torch.cuda.is_available()
    assert gpu_fit["settings"]["keras_backend"] == "torch"
    assert gpu_fit["settings"]["device"] == ("cuda" if cuda else "cpu")
    counts = sorted({2, max(2, CORES // 2)})
    untimed = {"ceiling", "host-batch"} | ({"host-batch-pinned"} if cuda else set())
    ringfeed = {f"ringfeed-{kind}-w{w}" for kind in ("generator", "torch") for w in counts} \
        | ({f"ringfeed-torch-pinned-w{w}" for w in counts} if cuda else set())
    rows = {row["name"]: row for row in gpu_fit["inputs"]}
    assert set(rows) == untimed | ringfeed | {"classic-generator", "torch-dataloader"}
    for name, row in rows.items():
        assert row["median_steps_per_s"] > 0 and row["ratio_to_ceiling"] > 0 and row["round_ratio_to_ceiling"] > 0
        assert row["ratio_to_host_batch"] > 0 and row["ratio_to_torch_dataloader"] > 0
        assert len(row["rounds"]) == QUICK_ROUNDS
        assert (row["median_stall_share"] is None) == (name in untimed)
        assert name in untimed or 0 <= row["median_stall_share"] <= 1
    assert ("pin_memory_check" in gpu_fit) == cuda


def test_delivery_measures_every_route(delivery):
    rows = {row["name"]: row for row in delivery["routes"]}
    assert set(rows) == {f"{how}-w{w}" for how in ("next_batch", "generator") for w in worker_counts()}
    for row in rows.values():
        assert row["median_batches_per_s"] > 0 and row["median_client_cpu_us_per_batch"] > 0
        assert row["median_broker_cpu_us_per_batch"] >= 0 and row["median_workers_cpu_us_per_batch"] >= 0
        assert isinstance(row["meets_targets"], bool) and len(row["rounds"]) == QUICK_ROUNDS


def test_remote_measures_raw_pyzmq_and_every_ringfeed_route(remote):
    rows = {row["name"]: row for row in remote["contenders"]}
    assert set(rows) == {"raw pyzmq tcp", "raw pyzmq tcp, 16 buffers in turn",
                         "raw pyzmq tcp, sender makes each batch (1 core)", "ringfeed tcp frames",
                         "ringfeed tcp frames, plain stores",
                         "ringfeed shm (same server)", "ringfeed 3 servers fan-in"}
    assert rows["raw pyzmq tcp"]["ratio_to_raw_pyzmq"] == pytest.approx(1.0)
    for name, row in rows.items():
        assert row["median_mb_per_s"] > 0 and row["ratio_to_raw_ring_buffers"] > 0
        assert row["ratio_to_raw_sender_making_batches"] > 0
        assert len(row["rounds_mb_per_s"]) == QUICK_ROUNDS
        assert (row["median_samples_per_s"] is None) == name.startswith("raw pyzmq")


def test_report_renders_and_replaces_only_its_blocks(throughput, fit, delivery, remote, torch_fit, out):
    with_torch = torch_fit is not None
    printed = run_script("report.py", out, "--results", str(out)).stdout
    assert ("Keras `model.fit` on the torch backend" in printed) == with_torch
    assert "tf.data map(AUTOTUNE)" in printed and "steps/s" in printed and "batches/s" in printed
    assert "16 buffers in turn" in printed
    assert "throughput.png" in printed and "benchmarks/throughput.py" in printed
    assert "benchmarks/fit.py --quick  # " in printed  # each reproduce line says how long its run took
    results_md, readme = out / "RESULTS.md", out / "README.md"
    results_md.write_text("# title\n\nbefore\n<!-- results:start -->\nold numbers\n<!-- results:end -->\nafter\n")
    readme.write_text("# readme\n\nabove\n<!-- summary:start -->\nold summary\n<!-- summary:end -->\nbelow\n")
    run_script("report.py", out, "--results", str(out), "--write", "--results-md", str(results_md),
               "--readme", str(readme))
    text = results_md.read_text()
    assert text.startswith("# title\n\nbefore\n<!-- results:start -->\n")
    assert text.endswith("<!-- results:end -->\nafter\n")
    row = next(line for line in printed.splitlines() if line.startswith("| tf.data"))
    assert "old numbers" not in text and row in text
    summary = readme.read_text()
    assert summary.startswith("# readme\n\nabove\n<!-- summary:start -->\n")
    assert summary.endswith("<!-- summary:end -->\nbelow\n") and "old summary" not in summary
    assert "× tf.data" in summary and "[RESULTS.md](RESULTS.md)" in summary


# -- benchmarks/images.py -------------------------------------------------------------

IMAGE_CONTENDERS = {"tf.data", "tf.data-uint8", "keras-image-dataset", "torch-torchvision", "torch-torchvision-uint8",
                    "torch-pillow", "torch-pillow-uint8", "in-process-limit", "in-process-limit-uint8",
                    "ringfeed-folder", "ringfeed-folder-uint8", "ringfeed-packed", "ringfeed-packed-uint8"}


@pytest.fixture(scope="module")
def images(runs, image_folder) -> tuple[dict, Path]:
    """A quick run of its own (data made afresh in a temporary folder), apart from the others' results."""
    pytest.importorskip("sklearn")  # the photographs the JPEGs are cut from
    return quick_result(runs, "images", image_folder / "out"), image_folder / "out"


def test_images_measures_every_contender_or_says_why_not(images):
    result, out = images
    measured = {row["name"]: row for row in result["contenders"]}
    skipped = {row["name"]: row["reason"] for row in result["skipped"]}
    assert set(measured) | set(skipped) == IMAGE_CONTENDERS and not set(measured) & set(skipped)
    assert all(isinstance(reason, str) and reason for reason in skipped.values())
    must = IMAGE_CONTENDERS - {name for name in IMAGE_CONTENDERS if name.startswith("torch-")}
    if importlib.util.find_spec("torch") is not None:
        must |= {"torch-pillow", "torch-pillow-uint8"}
    assert must <= set(measured), sorted(must - set(measured))
    batch = result["settings"]["batch_size"]
    for name, row in measured.items():
        dtype = "uint8" if name.endswith("-uint8") else "float32"
        assert row["dtype"] == dtype and row["delivered"] == {"x": [[batch, 224, 224, 3], dtype]}, name
        assert row["median_images_per_s"] > 0 and row["median_mb_per_s"] > 0 and row["images_per_s_per_core"] > 0
        assert row["ratio_to_tf_data"] > 0 and len(row["rounds"]) == QUICK_ROUNDS
        assert all(r["images_per_s"] > 0 and r["batches"] > 0 for r in row["rounds"])
    assert measured["tf.data"]["ratio_to_tf_data"] == pytest.approx(1.0)
    assert (out / "images.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = result["settings"]["data"]
    assert data["images"] == result["settings"]["images"] >= batch and data["classes"] == 10 and data["quality"] == 90


def test_images_reports_the_target_ratios_per_core_figures_and_dct_share(images):
    result, out = images
    comparisons = {c["what"]: c for c in result["comparisons"]}
    targets = {("in-process-limit", 0.9), ("tf.data", 1.3)}
    for dtype in ("float32", "uint8"):
        suffix = "" if dtype == "float32" else "-uint8"
        rows = [c for c in comparisons.values()
                if c["what"].endswith(dtype) and c["contender"] == f"ringfeed-packed{suffix}"]
        got = {(c["reference"].removesuffix("-uint8"), c["target"]) for c in rows if c["reference"]}
        assert {(name, t) for name, t in targets} <= got
        best = next(c for c in rows if c["target"] == 2.0)  # the best DataLoader setup of that dtype
        assert best["reference"] is None or best["reference"].startswith("torch-")
    for c in comparisons.values():
        if c["reference"] is None:  # no DataLoader could run (torch missing)
            assert importlib.util.find_spec("torch") is None and c["ratio"] is None
        else:  # a positive number: how fast is for the full run to say, never for a test
            assert c["ratio"] > 0 and c["median_round_ratio"] > 0 and isinstance(c["met"], (bool, type(None)))
    per_core = result["per_core"]
    assert per_core["ffcv"]["per_vcpu"] == pytest.approx(31278 / 96)
    for name in ("ringfeed-packed", "ringfeed-packed-uint8", "in-process-limit", "in-process-limit-uint8"):
        assert per_core[name]["images_per_s_per_core"] > 0 and per_core[name]["ratio_to_ffcv_per_vcpu"] > 0
    dct = result["dct"]
    assert dct["full_us_per_image"] > 0 and dct["scaled_us_per_image"] > 0 and dct["share_saved"] < 1
    assert sum(dct["factors"].values()) == dct["samples"] and set(dct["factors"]) == {"1", "2", "4", "8"}
    printed = run_script("report.py", out, "--results", str(out)).stdout
    assert "**Image files** (`benchmarks/images.py`)" in printed and "images.png" in printed
    assert "ringfeed packed vs the in-process limit, float32" in printed and "FFCV" in printed
    assert "benchmarks/images.py --quick" in printed
