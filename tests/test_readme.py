"""The snippets of README.md and the docs it links to, run as they are printed; their links resolve."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SERVER_DOC = REPO / "loader_server" / "README.md"
# Every markdown file the project writes: its python blocks are run below or say why not.
DOCS = (README, REPO / "docker" / "README.md", SERVER_DOC, REPO / "benchmarks" / "RESULTS.md")


NOT_RUN = "<!-- not run:"  # the line before a block no test runs, saying why
RUN_BY = {  # (doc, section) whose python blocks the tests below run, all of them
    (README, "Use it from `model.fit`"): "test_the_fit_section_runs_as_printed_without_warnings",
    (README, "From Python, without the CLI"): "test_the_service_from_python_snippet_runs_as_printed",
    (README, "Samples with several fields"): "test_the_several_fields_example_runs_as_printed",
    (SERVER_DOC, "Per-sample Python"): "test_the_python_op_snippet_and_its_toml_run_as_printed",
    (SERVER_DOC, "Custom ops"): "test_the_custom_op_snippet_runs_as_an_op",
}


def _all_blocks(doc: Path = README) -> list[tuple[str, str, str, bool]]:
    """(section, language, code, marked not-run) of every fenced block of ``doc``, by nearest heading."""
    blocks, section, lines = [], "", doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        elif line.startswith("```") and len(line) > 3:
            end = lines.index("```", i + 1)
            marked = i > 0 and lines[i - 1].startswith(NOT_RUN)
            blocks.append((section, line[3:], "\n".join(lines[i + 1:end]) + "\n", marked))
            i = end
        i += 1
    return blocks


def _blocks(section: str, runnable_only: bool = False, doc: Path = README) -> list[tuple[str, str]]:
    """(language, code) of each fenced block of ``doc`` under the heading ``section``."""
    return [(language, code) for heading, language, code, marked in _all_blocks(doc)
            if heading == section and not (runnable_only and marked)]


def test_every_python_block_is_run_by_a_test_or_says_why_not():
    blocks = [(doc, section, marked) for doc in DOCS for section, language, _, marked in _all_blocks(doc)
              if language == "python"]
    assert len(blocks) >= 8
    unrun = [f"{doc.relative_to(REPO)}: {section}" for doc, section, marked in blocks
             if not marked and (doc, section) not in RUN_BY]
    assert unrun == []
    assert all(name in globals() for name in RUN_BY.values())


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_docs_names_a_file_and_heading_that_exist():
    checked = 0
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            assert linked.exists(), f"{doc.relative_to(REPO)} links to {target}, which does not exist"
            if anchor:
                headings = [_anchor(line.lstrip("#")) for line in linked.read_text().splitlines()
                            if line.startswith("#")]
                assert anchor in headings, f"{doc.relative_to(REPO)} links to {target}: no such heading"
            checked += 1
    assert checked >= 8


def test_the_readme_stays_short_and_its_results_are_a_generated_summary():
    """Long material lives in the docs it links to; figures come from benchmarks/report.py."""
    text = README.read_text()
    assert len(text.splitlines()) <= 310
    assert re.search(r"ringfeed [0-9a-f]{10}", text) is None, "commit hashes belong in benchmarks/RESULTS.md"
    summary = text[text.index("<!-- summary:start -->"):text.index("<!-- summary:end -->")]
    assert "benchmarks/RESULTS.md" in summary and "<!-- results:start -->" not in text
    assert text.count("×") - summary.count("×") <= 3  # rules such as heartbeat_s's 1.5×; no ratios in prose


def test_the_several_fields_example_runs_as_printed(tmp_path, capsys):
    (language, code), *_ = _blocks("Samples with several fields")
    assert language == "python"
    script = tmp_path / "example.py"
    script.write_text(code)
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "{'image': (64, 28, 28, 3), 'meta': (64, 16)} (64, 28, 28) (64,)" in printed


def test_the_python_op_snippet_and_its_toml_run_as_printed(tmp_path, monkeypatch, name):
    from ringfeed import Feed
    from ringfeed.server import Config, Service

    blocks = _blocks("Per-sample Python", doc=SERVER_DOC)
    module = next(code for language, code in blocks if language == "python" and "def rotate" in code)
    table = next(code for language, code in blocks if language == "toml")
    (tmp_path / "my_ops.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    augment = tomllib.loads(table)["augment"]
    images = np.random.default_rng(0).integers(0, 256, (32, 12, 12, 3), np.uint8)
    config = Config(batch_size=8, workers=1, name=name, inputs="image", targets="label", augment=augment)
    with Service(config, fields={"image": images, "label": np.arange(32)}) as svc, Feed(svc.endpoint) as feed:
        x, y = feed.next_batch()
    assert x.shape == (8, 12, 12, 3) and x.dtype == np.uint8 and not np.array_equal(x, images[y])


def test_the_imagenet_style_config_makes_224_pixel_float_batches_from_an_image_folder(tmp_path):
    from test_images import write_image_folder

    from ringfeed.server import Config, shm
    from ringfeed.server.batches import BatchMaker
    from ringfeed.server.service import prepare_source

    (language, code), = _blocks("Image files")
    assert language == "toml"
    options = tomllib.loads(code)
    assert options["batch_size"] == 256
    root = write_image_folder(tmp_path / "set", per_class=(2, 2))
    config = Config(**{**options, "batch_size": 4, "workers": 1, "data": str(root)})
    config, source, owned = prepare_source(config, "readme01")
    try:
        maker = BatchMaker(config, source)
        batch = maker.empty_batch()
        maker.make(0, 0, batch)
    finally:
        for segment in owned:
            shm.unlink(segment)
    assert batch["image"].shape == (4, 224, 224, 3) and batch["image"].dtype == np.float32
    assert sorted(batch["label"].tolist()) == [0, 0, 1, 1]


def _tiny_model():
    import keras

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(4)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _run_python(code: str, namespace: dict) -> None:
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__", **namespace})


def _run_sh(code: str, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for line in code.splitlines():
        command = line.split("#")[0].strip()
        if command:
            out = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True,
                                 timeout=120)
            assert out.returncode == 0, f"{command}: {out.stdout[-2000:]}{out.stderr[-2000:]}"


def test_the_fit_section_runs_as_printed_without_warnings(tmp_path, monkeypatch):
    """The section's shell lines against a real background service on a tiny dataset, and each
    of its python blocks, in order, with ``model`` a small compiled Keras model."""
    data = tmp_path / "my_dataset"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "features.npy", rng.random((64, 8, 8, 3), dtype=np.float32))
    np.save(data / "labels.npy", np.arange(64) % 4)
    (tmp_path / "ringfeed.toml").write_text("batch_size = 8\nworkers = 1\n")
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("Use it from `model.fit`", runnable_only=True)
    stops = [code for language, code in blocks if "ringfeed stop" in code]
    assert blocks[0][0] == "sh" and "ringfeed start" in blocks[0][1] and len(stops) == 1
    try:  # the service stops last, after every snippet has used it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for language, code in blocks:
                if language == "python":
                    _run_python(code, {"model": _tiny_model()})
                elif code not in stops:
                    _run_sh(code, tmp_path)
    finally:
        _run_sh(stops[0], tmp_path)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert [language for language, _ in blocks].count("python") >= 3
    assert (tmp_path / "checkpoints" / "latest.json").exists()


def test_the_service_from_python_snippet_runs_as_printed():
    import keras

    (language, code), = _blocks("From Python, without the CLI")
    assert language == "python" and "Service(config" in code
    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((56, 56, 3)), keras.layers.Flatten(), keras.layers.Dense(4)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = []
    model.fit = lambda *args, **kwargs: history.append(keras.Model.fit(model, *args, **kwargs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_python(code, {"x_train": rng.random((512, 64, 64, 3), dtype=np.float32),
                           "y_train": np.arange(512) % 4, "model": model})
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert len(history[0].history["loss"]) == 5


def test_the_custom_op_snippet_runs_as_an_op(tmp_path, monkeypatch, name):
    from ringfeed import Feed
    from ringfeed.server import Config, Service

    (language, code), = [block for block in _blocks("Custom ops", doc=SERVER_DOC) if block[0] == "python"]
    (tmp_path / "readme_ops.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}")
    features = np.linspace(0, 1, 16 * 4 * 4 * 1, dtype=np.float32).reshape(16, 4, 4, 1)
    config = Config(batch_size=16, workers=1, name=name, sampling="shuffle",
                    augment=[{"op": "custom", "fn": "readme_ops:solarize", "params": [0.5]}])
    with Service(config, features=features, labels=np.arange(16)) as svc, Feed(svc.endpoint) as feed:
        x, y = feed.next_batch(copy=True)
    source = features[y]
    assert np.allclose(x, np.where(source > 0.5, 1.0 - source, source))
