"""ringfeed's server: numba workers, a shared-memory ring and a ZeroMQ broker.

``Service`` and ``run_server`` are imported on first use: the ``ringfeed`` command's quick
subcommands (``status``, ``stop``, ``--help``) then start without loading numba.
"""

from .config import Config, ConfigError, load_config, load_toml

__all__ = ["Config", "ConfigError", "Service", "load_config", "load_toml", "run_server"]


def __getattr__(name: str):
    if name in ("Service", "run_server"):
        from . import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
