"""Frozen, validated service options, loaded from TOML with flags over it.

Every bad value is refused in ``__post_init__`` with a ``ConfigError`` that
names the option, the value and what was expected.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from client.paths import check_endpoint, check_name, default_endpoint
from client.structure import DEFAULT_INPUTS, DEFAULT_TARGETS, Structure, StructureError

SAMPLING_MODES = ("shuffle", "replacement")
# A client sends tens of KB/s at the most (ACKs, PINGs; its HELLO fits the guard's burst): below
# this, a busy client could be cut.
MIN_INBOUND_BYTES_PER_S = 64 * 1024
ON_ERROR_MODES = ("raise", "skip")
IMAGE_CHANNELS = (1, 3)
AUTO_WORKERS = "auto"


class ConfigError(ValueError):
    """A bad option, data file or pipeline, found before anything starts."""


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any, minimum_exclusive: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > minimum_exclusive:
        raise ConfigError(f"{name} must be a number > {minimum_exclusive}, got {value!r}")


def _check_metrics_address(host: Any, port: Any) -> None:
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
        raise ConfigError(f"metrics_port must be an integer from 0 to 65535 (0: any free port), got {port!r}")
    try:
        if not isinstance(host, str):
            raise ValueError(host)
        if host != "localhost":
            ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"metrics_host must be an IP address or 'localhost', got {host!r}") from None


@dataclass(frozen=True)
class Config:
    data: str | None = None
    inputs: str | tuple | None = None  # None: "features", or "image" for a dataset of image files
    targets: str | tuple | None = None  # None: "labels", or "label" for a dataset of image files
    sample_weight: str | None = None
    image_channels: int = 3
    batch_size: int = 32
    workers: int | str = field(default_factory=lambda: os.cpu_count() or 1)  # or "auto" (autotune.py)
    max_workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # processes started with "auto"
    slots: int | None = None
    seed: int = 0
    sampling: str = "shuffle"
    steps_per_epoch: int | None = None
    endpoint: str | None = None
    name: str = "default"
    ordered: bool = True
    on_error: str = "raise"
    augment: tuple = ()
    jit: bool = True
    private_data: bool = False
    streaming_stores: bool = True
    threads_per_worker: int = 1
    worker_nice: int = 10
    heartbeat_s: float = 1.0
    task_timeout_s: float = 5.0
    max_clients: int = 64
    start_timeout_s: float = 300.0
    max_worker_restarts: int = 10
    curve_secret_key: str | None = None
    curve_authorized_keys: str | None = None
    max_connections: int | None = None  # None: min(4096, fd limit // 4), set at server start
    max_inbound_bytes_per_s: int = 1 << 20
    metrics_port: int | None = None  # opt-in Prometheus endpoint; 0 takes a free port (status names it)
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        _check_int("batch_size", self.batch_size, 1)
        if self.workers != AUTO_WORKERS:
            if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
                raise ConfigError(f"workers must be an integer >= 1, got {self.workers!r} "
                                  f"(or {AUTO_WORKERS!r}, to autotune how many are busy)")
        _check_int("max_workers", self.max_workers, 1)
        _check_int("seed", self.seed, 0)
        _check_int("threads_per_worker", self.threads_per_worker, 1)
        _check_int("max_worker_restarts", self.max_worker_restarts, 0)
        _check_int("worker_nice", self.worker_nice, 0)
        if self.worker_nice > 19:
            raise ConfigError(f"worker_nice must be at most 19 (the lowest priority), got {self.worker_nice!r}")
        if self.max_connections is not None:
            _check_int("max_connections", self.max_connections, 1)
        _check_int("max_inbound_bytes_per_s", self.max_inbound_bytes_per_s, MIN_INBOUND_BYTES_PER_S)
        _check_metrics_address(self.metrics_host, self.metrics_port)
        _check_number("heartbeat_s", self.heartbeat_s, 0.0)
        _check_number("task_timeout_s", self.task_timeout_s, 0.0)
        _check_int("max_clients", self.max_clients, 1)
        _check_number("start_timeout_s", self.start_timeout_s, 0.0)
        if self.slots is None:
            # A client's credit (tasks in flight included) is at most half the ring, and a feed's
            # default prefetch of 16 covers the batches made while finished work is reported and
            # its credit comes back (with 8, two workers making 1.3 ms batches idled 20% of the
            # time). The other half holds the batches trainers keep, and other feeds' credit.
            object.__setattr__(self, "slots", max(32, 4 * self.worker_processes + 8))
        _check_int("slots", self.slots, 3)
        if self.steps_per_epoch is not None:
            _check_int("steps_per_epoch", self.steps_per_epoch, 1)
        if self.sampling not in SAMPLING_MODES:
            raise ConfigError(f"sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")
        if self.on_error not in ON_ERROR_MODES:
            raise ConfigError(f"on_error must be one of {ON_ERROR_MODES}, got {self.on_error!r}")
        for option in ("ordered", "jit", "private_data", "streaming_stores"):
            if not isinstance(getattr(self, option), bool):
                raise ConfigError(f"{option} must be true or false, got {getattr(self, option)!r}")
        try:
            check_name(self.name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.data is not None and not isinstance(self.data, str):
            raise ConfigError(f"data must be a path string, got {self.data!r}")
        if self.endpoint is None:
            object.__setattr__(self, "endpoint", default_endpoint(self.name))
        try:
            check_endpoint(self.endpoint)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if (self.curve_secret_key is None) != (self.curve_authorized_keys is None):
            raise ConfigError("curve_secret_key and curve_authorized_keys go together; got "
                              f"{self.curve_secret_key!r} and {self.curve_authorized_keys!r}")
        for option in ("curve_secret_key", "curve_authorized_keys"):
            path = getattr(self, option)
            if path is not None and not Path(path).exists():
                raise ConfigError(f"{option} {path!r} does not exist (make keys with: ringfeed keys DIR)")
        if self.image_channels not in IMAGE_CHANNELS:
            raise ConfigError(f"image_channels must be one of {IMAGE_CHANNELS} (grayscale or RGB), "
                              f"got {self.image_channels!r}")
        structure = self.structure
        for role in ("inputs", "targets"):  # TOML gives lists; a frozen config holds tuples
            if getattr(self, role) is not None:
                object.__setattr__(self, role, getattr(structure, role))
        augment = tuple(self.augment)
        for i, spec in enumerate(augment):
            if not isinstance(spec, dict) or not isinstance(spec.get("op"), str):
                raise ConfigError(f"augment[{i}] must be a table with a string 'op', got {spec!r}")
        object.__setattr__(self, "augment", augment)

    @property
    def worker_processes(self) -> int:
        """How many worker processes the server starts: ``max_workers`` with ``workers = "auto"``."""
        return self.max_workers if self.workers == AUTO_WORKERS else self.workers

    @property
    def structure(self) -> Structure:
        """Which fields the trainer receives, and where: ``(x, y)`` or ``(x, y, w)``."""
        try:
            return Structure(DEFAULT_INPUTS if self.inputs is None else self.inputs,
                             DEFAULT_TARGETS if self.targets is None else self.targets, self.sample_weight)
        except StructureError as exc:
            raise ConfigError(str(exc)) from None

    def with_overrides(self, **overrides: Any) -> "Config":
        """A copy with the given options replaced; ``None`` values are ignored."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


CONFIG_KEYS = frozenset(f.name for f in fields(Config))


def from_mapping(options: dict[str, Any]) -> Config:
    unknown = sorted(set(options) - CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; known options are {sorted(CONFIG_KEYS)}")
    return Config(**options)


def load_toml(path: str | os.PathLike, **overrides: Any) -> Config:
    """Read a ringfeed TOML file; ``overrides`` (flags) win over the file."""
    path = Path(path)
    try:
        options = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    if "data" in options and isinstance(options["data"], str):
        data = Path(options["data"]).expanduser()
        options["data"] = str(data if data.is_absolute() else path.parent / data)
    options.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(options)
