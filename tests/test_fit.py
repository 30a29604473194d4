"""Keras model.fit trained through ringfeed on scikit-learn's digits (nothing downloaded)."""

import re
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("sklearn")


def test_demo_command_trains_through_the_generator():
    out = subprocess.run([sys.executable, "-m", "loader_server.cli", "demo", "--epochs", "8"],
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    accuracy = float(re.search(r"validation accuracy\s+([\d.]+)", out.stdout).group(1))
    assert accuracy >= 0.9
    assert re.search(r"loader delivered\s+\d+ samples/s", out.stdout)
    assert "Epoch 8/8" in out.stdout and "ringfeed stopped" in out.stdout


def test_model_fit_through_as_tf_dataset():
    from loader_server.demo import run_demo

    result = run_demo(epochs=8, use_tf_dataset=True)
    assert result["val_accuracy"] >= 0.9
    assert result["batches_served"] >= 8 * 46
