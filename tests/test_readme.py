"""The README's snippets for samples with several fields, run as they are printed."""

from __future__ import annotations

import re
import runpy
import tomllib
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(section: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block in the README section titled ``section``."""
    text = README.read_text()
    body = text[text.index(f"## {section}\n"):]
    body = body[:body.index("\n## ", 1)]
    return re.findall(r"```(\w+)\n(.*?)```", body, re.S)


def test_the_several_fields_example_runs_as_printed(tmp_path, capsys):
    (language, code), *_ = _blocks("Samples with several fields")
    assert language == "python"
    script = tmp_path / "example.py"
    script.write_text(code)
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "{'image': (64, 28, 28, 3), 'meta': (64, 16)} (64, 28, 28) (64,)" in printed


def test_the_python_op_snippet_and_its_toml_run_as_printed(tmp_path, monkeypatch, name):
    from client import Feed
    from loader_server import Config, Service

    blocks = _blocks("Samples with several fields")
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

    from loader_server import Config, shm
    from loader_server.batches import BatchMaker
    from loader_server.service import prepare_source

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
