"""Frozen, validated service options, loaded from TOML with flags over it.

Every bad value is refused in ``__post_init__`` with a ``ConfigError`` that
names the option, the value and what was expected.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ringfeed.paths import check_endpoint, check_name, default_endpoint
from ringfeed.structure import DEFAULT_INPUTS, DEFAULT_TARGETS, Structure, StructureError

SAMPLING_MODES = ("shuffle", "replacement")
# A client sends tens of KB/s at the most (ACKs, PINGs; its HELLO fits the guard's burst): below
# this, a busy client could be cut.
MIN_INBOUND_BYTES_PER_S = 64 * 1024
ON_ERROR_MODES = ("raise", "skip")
IMAGE_CHANNELS = (1, 3)
AUTO_WORKERS = "auto"
MAX_CONFIG_FILE_BYTES = 1 << 20  # a config is a few KB; an augment list of thousands of ops still fits


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


def _option(default: Any = MISSING, *, doc: str, flag: str | None = None, means: str | None = None,
            factory: Any = MISSING) -> Any:
    """A Config field with its documentation: ``doc`` (markdown, the README's reference table and
    the flag's help), the ``flag`` that sets it, and what the default ``means`` where the value
    alone does not say (None, or computed at start)."""
    return field(default=default, default_factory=factory,
                 metadata={"doc": doc, "flag": flag, "means": means})


def _cores() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Config:
    data: str | None = _option(
        None, flag="--data", means="none: give it here or in the TOML file",
        doc="the dataset: a folder of `.npy` fields, an `.npz`, an image folder, a `.csv` list file or a "
            "ringfeed pack file (in a TOML file, relative to it)")
    inputs: str | tuple | None = _option(
        None, means='`"features"` (`"image"` for image files)',
        doc="field name, or list of names (x becomes a dict), the trainer gets as x")
    targets: str | tuple | None = _option(
        None, means='`"labels"` (`"label"` for image files)',
        doc="field name, or list of names (y becomes a dict), the trainer gets as y")
    sample_weight: str | None = _option(
        None, means="none", doc="field given as per-sample weights: the element becomes `(x, y, w)`")
    image_channels: int = _option(3, doc="what encoded images decode to: 3 (RGB) or 1 (grayscale)")
    batch_size: int = _option(32, flag="--batch-size", doc="samples per batch")
    workers: int | str = _option(
        factory=_cores, flag="--workers", means="the number of cores",
        doc='worker processes, or `"auto"`: start `max_workers` and give tasks to only as many as keep the '
            "ring from running dry")
    max_workers: int = _option(factory=_cores, flag="--max-workers", means="the number of cores",
                               doc='worker processes started with `workers = "auto"`')
    slots: int | None = _option(None, flag="--slots", means="max(32, 4 * workers + 8)",
                                doc="batches in the shared-memory ring (`max_workers` counts with `\"auto\"`)")
    seed: int = _option(0, flag="--seed", doc="the seed the stream is a pure function of")
    sampling: str = _option(
        "shuffle", flag="--sampling",
        doc="`shuffle`: each sample once per epoch, last partial batch dropped; `replacement`: random ids, "
            "as the classic Keras generator")
    steps_per_epoch: int | None = _option(
        None, flag="--steps-per-epoch", means="N // batch_size",
        doc="batches per epoch; when shuffling, more than N // batch_size is refused at start, with the maximum")
    endpoint: str | None = _option(None, flag="--endpoint", means="`ipc://<runtime>/<name>.sock`",
                                   doc="where clients connect: `ipc://PATH` or `tcp://HOST:PORT`")
    name: str = _option("default", flag="--name", doc="the service name, for several services on one host")
    ordered: bool = _option(True, doc="deliver in batch order (`false`: as batches finish)")
    on_error: str = _option(
        "raise", flag="--on-error",
        doc="`raise`: an op's exception reaches the trainer; `skip`: the sample is replaced and counted")
    augment: tuple = _option((), means="none", doc="the pipeline, a list of `[[augment]]` tables (Augmentation)")
    jit: bool = _option(True, doc="`false` runs the kernels as plain Python (debugging)")
    private_data: bool = _option(
        False, doc="each worker reads its own copy of the features, in transparent huge pages")
    streaming_stores: bool = _option(
        True, doc="workers write float batches into slots with streaming stores where they can; `false` to "
                  "compare")
    threads_per_worker: int = _option(1, doc="numba threads in each worker")
    worker_nice: int = _option(
        10, doc="workers' niceness: a trainer on the same host wins the CPU and the ring covers the difference "
                "(19 yields even more; 0 competes evenly)")
    heartbeat_s: float = _option(
        1.0, doc="liveness interval between broker and clients; a TCP client silent for 1.5× this is dropped "
                 "and told so, and says HELLO again when it is back")
    task_timeout_s: float = _option(
        5.0, doc="a worker with tasks that reports nothing for max(this, 10× the recent time per batch) is "
                 "killed and replaced, and its batches recomputed once")
    max_clients: int = _option(64, doc="clients served at once; a HELLO past it is refused with the reason")
    start_timeout_s: float = _option(300.0, doc="how long workers may take to warm up")
    max_worker_restarts: int = _option(10, doc="worker restarts allowed per minute")
    curve_secret_key: str | None = _option(None, flag="--curve-secret-key", means="none, no CURVE",
                                           doc="the server's CURVE secret key file (from `ringfeed keys`)")
    curve_authorized_keys: str | None = _option(
        None, flag="--curve-authorized-keys", means="none, no CURVE",
        doc="the folder of client public keys let in (with `--curve-secret-key`)")
    max_connections: int | None = _option(  # resolved at server start
        None, means="min(4096, fd limit ÷ 4)",
        doc="peer connections the endpoint holds at once; past it a new connection is closed at once (the "
            "server raises its soft fd limit to the hard limit at start)")
    max_inbound_bytes_per_s: int = _option(
        1 << 20, means="1048576 (1 MiB)",
        doc="bytes a TCP connection may send the server per second, with a burst of 128 KiB, checked every "
            "0.1 s; a connection over it is closed. A client sends tens of KB/s at the most; at least 65536")
    metrics_port: int | None = _option(
        None, means="none (off)",
        doc="serve Prometheus metrics at `http://metrics_host:PORT/metrics`; 0 takes a free port, which "
            "`ringfeed status --json` gives as `metrics_url`")
    metrics_host: str = _option(
        "127.0.0.1", doc="the address the metrics endpoint binds, an IP address or `localhost`; only this one "
                         "(`0.0.0.0` to let other hosts scrape it, which the server warns about)")

    def __post_init__(self) -> None:
        self._check_counts()
        self._check_choices()
        self._check_where()
        self._normalize()

    def _check_counts(self) -> None:
        _check_int("batch_size", self.batch_size, 1)
        if self.workers != AUTO_WORKERS:
            if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
                raise ConfigError(f"workers must be an integer >= 1, got {self.workers!r} "
                                  f"(or {AUTO_WORKERS!r}, to autotune how many are busy)")
        for name, minimum in (("max_workers", 1), ("seed", 0), ("threads_per_worker", 1),
                              ("max_worker_restarts", 0), ("worker_nice", 0), ("max_clients", 1),
                              ("max_inbound_bytes_per_s", MIN_INBOUND_BYTES_PER_S)):
            _check_int(name, getattr(self, name), minimum)
        if self.worker_nice > 19:
            raise ConfigError(f"worker_nice must be at most 19 (the lowest priority), got {self.worker_nice!r}")
        for name in ("max_connections", "steps_per_epoch"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name in ("heartbeat_s", "task_timeout_s", "start_timeout_s"):
            _check_number(name, getattr(self, name), 0.0)
        if self.slots is None:
            # A client's credit (tasks in flight included) is at most half the ring, and a feed's
            # default prefetch of 16 covers the batches made while finished work is reported and
            # its credit comes back (with 8, two workers making short batches idled a fifth of
            # the time). The other half holds the batches trainers keep, and other feeds' credit.
            object.__setattr__(self, "slots", max(32, 4 * self.worker_processes + 8))
        _check_int("slots", self.slots, 3)

    def _check_choices(self) -> None:
        if self.sampling not in SAMPLING_MODES:
            raise ConfigError(f"sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")
        if self.on_error not in ON_ERROR_MODES:
            raise ConfigError(f"on_error must be one of {ON_ERROR_MODES}, got {self.on_error!r}")
        for option in ("ordered", "jit", "private_data", "streaming_stores"):
            if not isinstance(getattr(self, option), bool):
                raise ConfigError(f"{option} must be true or false, got {getattr(self, option)!r}")
        if self.image_channels not in IMAGE_CHANNELS:
            raise ConfigError(f"image_channels must be one of {IMAGE_CHANNELS} (grayscale or RGB), "
                              f"got {self.image_channels!r}")

    def _check_where(self) -> None:
        """The name, the endpoint and the files the service uses."""
        _check_metrics_address(self.metrics_host, self.metrics_port)
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

    def _normalize(self) -> None:
        """TOML and JSON give lists; a frozen config holds tuples."""
        structure = self.structure
        for role in ("inputs", "targets"):
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

    def to_json(self) -> dict:
        """Every option, resolved (endpoint, slots, worker counts): a server started from it
        runs exactly this configuration, wherever it starts."""
        return {option.name: getattr(self, option.name) for option in fields(self)}


CONFIG_KEYS = frozenset(f.name for f in fields(Config))


def from_mapping(options: dict[str, Any]) -> Config:
    unknown = sorted(set(options) - CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; known options are {sorted(CONFIG_KEYS)}")
    return Config(**options)


def load_config(path: str | os.PathLike, **overrides: Any) -> Config:
    """A TOML file, or a ``.json`` resolved config (``Config.to_json``, what ``ringfeed start``
    hands its server); ``overrides`` (flags) win over either."""
    return (load_json if Path(path).suffix == ".json" else load_toml)(path, **overrides)


def load_json(path: str | os.PathLike, **overrides: Any) -> Config:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    if len(text) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"config file {str(path)!r} is over {MAX_CONFIG_FILE_BYTES} bytes")
    try:
        options = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise ConfigError(f"config file {str(path)!r} holds a JSON {type(options).__name__}, expected an object")
    options.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(options)


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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`" if isinstance(value, str) else str(value)


def default_text(option: Field, markdown: bool = True) -> str:
    """What option's default is: its stated meaning, else the value (backquoted TOML in markdown)."""
    text = option.metadata["means"] or (_toml_value(option.default) if markdown else str(option.default))
    return text if markdown else text.replace("`", "")


def reference_table() -> str:
    """The README's configuration reference, from the fields' metadata: key, flag, default, meaning."""
    rows = ["| key | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for option in fields(Config):
        flag = f"`{option.metadata['flag']}`" if option.metadata["flag"] else ""
        rows.append(f"| `{option.name}` | {flag} | {default_text(option)} | {option.metadata['doc']} |")
    return "\n".join(rows) + "\n"
