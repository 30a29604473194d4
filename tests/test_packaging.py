"""The distribution's shape: entry point, and a client that stays light."""

import subprocess
import sys


def test_client_imports_neither_numba_nor_the_server_nor_tensorflow():
    code = ("import sys, client, client.fanin, client.status\n"
            "heavy = {'numba', 'loader_server', 'tensorflow', 'keras'} & set(sys.modules)\n"
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "ringfeed"]
    assert script.value == "loader_server.cli:main"
