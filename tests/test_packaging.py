"""The distribution's shape: one import name, its entry point, and a client that stays light."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT_S = 600  # base dependencies from the package index or pip's cache


def test_client_imports_neither_numba_nor_the_server_nor_tensorflow():
    code = ("import sys, ringfeed, ringfeed.fanin, ringfeed.status\n"
            "heavy = {'numba', 'ringfeed.server', 'tensorflow', 'keras'} & set(sys.modules)\n"
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "ringfeed"]
    assert script.value == "ringfeed.server.cli:main"


def test_a_fresh_venv_with_the_base_dependencies_imports_ringfeed_and_no_bare_names(tmp_path):
    """The wheel installs one top-level package, ``ringfeed``: a project with its own
    ``client.py`` or ``loader_server`` module keeps it."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True,
                           timeout=INSTALL_TIMEOUT_S)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("ringfeed-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"ringfeed"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    installed = subprocess.run([python, "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True,
                               timeout=INSTALL_TIMEOUT_S)
    assert installed.returncode == 0, installed.stderr
    works = subprocess.run([python, "-c", "import ringfeed\nfrom ringfeed import Config, FanInFeed, Feed, Service\n"
                            "assert Config(batch_size=8).batch_size == 8"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert works.returncode == 0, works.stderr
    for bare in ("client", "loader_server"):
        fails = subprocess.run([python, "-c", f"import {bare}"], capture_output=True, text=True, timeout=60,
                               cwd=tmp_path)
        assert fails.returncode == 1 and f"No module named '{bare}'" in fails.stderr
    version = subprocess.run([str(venv / "bin" / "ringfeed"), "--version"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("ringfeed "), version.stderr
