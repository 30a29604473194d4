"""ringfeed's server: numba workers, a shared-memory ring and a ZeroMQ broker."""

from .config import Config, ConfigError, load_toml
from .service import Service, run_server

__all__ = ["Config", "ConfigError", "Service", "load_toml", "run_server"]
