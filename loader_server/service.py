"""Run a ringfeed server: foreground (``run_server``) or from Python (``Service``).

Start-up: remove stale segments of dead servers, open and validate the data,
build the pipeline, plan the ring from the shapes and dtypes its ops declare,
compute one batch in-process (so bad config and kernels that fail to compile
are refused here, with a clear message, and the numba cache is warm for the
workers), create the ring, start the workers, and bind
the client endpoint only once every worker has said hello. Then write the
state file (pid, endpoint) that ``ringfeed status/stop`` read.

One server per name: start-up, and again the moment before binding, refuse
when a live server of the same name has a state file. A server records the
identity (device, inode) of the ipc socket file and the state file it made,
and at exit unlinks each only if the path still names that file (and the
state file still names this pid), so it never removes another server's.

Shutdown protocol, the one place it is written down:

1. SIGTERM or SIGINT sets the stop flag; the broker loop ends within ``TICK_S``.
2. Every worker is sent STOP (a sentinel task).
3. ``join(JOIN_TIMEOUT_S)``, then terminate, then kill what is left.
4. Sockets close with zero linger (the metrics endpoint's too, with
   ``metrics_port``); the ring and data segments are unlinked;
   the client endpoint's ipc socket file and the state file are removed if
   they are still the ones this server made.

Steps 2-4 also run when start-up fails part way. ``Service.stop`` is
idempotent, and a server killed outright is cleaned up by the next start
(``shm.remove_stale``). Workers never outlive the server (see ``worker.py``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import secrets
import signal
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import zmq

from ringfeed.paths import ensure_runtime_dir, ipc_socket_path, state_file
from ringfeed.protocol import MAX_JSON_BYTES

from . import background, shm, sources
from .broker import Broker
from .config import Config, ConfigError
from .connections import ConnectionGuard, cleartext_readers, default_max_connections, raise_fd_limit
from .pool import WorkerPool
from .procs import die_with_parent
from .ring import Ring, plan_layout
from .auth import secure_frontend
from .batches import BatchMaker, SampleError
from .worker import WorkerSpec

log = logging.getLogger("ringfeed.service")

STOP_TIMEOUT_S = 15.0
# The largest frame a client sends is a HELLO's JSON (MAX_JSON_BYTES; an ACK is at most
# 4 * (1 + MAX_RELEASES_PER_ACK) bytes); the rest covers CURVE's per-frame framing, many times over.
MAX_CLIENT_FRAME_BYTES = MAX_JSON_BYTES + 64 * 1024


class ServiceFailed(RuntimeError):
    """The service ran, then could not go on (no workers left); ``serve`` exits non-zero."""


def _refuse_if_running(name: str) -> None:
    running = background.read_state(name)
    if running is not None:
        raise background.BackgroundError(
            f"a ringfeed server named {name!r} is already running (pid {running['pid']}, endpoint "
            f"{running['endpoint']}); stop it first (ringfeed stop --name {name}) or choose another --name")


def _file_id(path: Path) -> shm.FileId:
    st = os.lstat(path)
    return shm.FileId(st.st_dev, st.st_ino)


def _write_state(path: Path, state: dict) -> shm.FileId:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(state))
        st = os.fstat(out.fileno())
    return shm.FileId(st.st_dev, st.st_ino)


def _names_us(state_path: Path) -> bool:
    try:
        return json.loads(state_path.read_text()).get("pid") == os.getpid()
    except (OSError, ValueError, AttributeError):
        return False


def _unlink_if_ours(path: Path, file_id: shm.FileId) -> None:
    """Unlink ``path`` only if it is still the file this server made (``file_id``)."""
    try:
        ours = _file_id(path) == file_id
    except FileNotFoundError:
        return
    if ours:
        path.unlink(missing_ok=True)
    else:
        log.info("left %s alone: it is no longer the file this server made", path)


def prepare_source(config: Config, token: str) -> tuple[Config, sources.SourceRef, list[str]]:
    """Open and validate ``config.data``; return the config with its default fields named, how
    workers find the data, and the segments to unlink."""
    if config.data is None:
        raise ConfigError("no data: give --data PATH (a folder of .npy files, one per field, such as "
                          "features.npy and labels.npy, an .npz file, an image folder or a packed file)")
    available = sources.field_names(config.data)
    config = sources.with_default_roles(config, available)
    sources.check_structure(config.structure, available, f"data {config.data!r}")
    fields = sources.load_path(config.data, config.structure.names)
    sources.validate_for(config, fields)
    path = Path(config.data)
    if sources.is_pack(path):
        return config, sources.SourceRef(pack=str(path), pack_fields=tuple(fields)), []
    if all(isinstance(array, np.memmap) for array in fields.values()):
        return config, sources.SourceRef(paths=tuple((name, str(path / f"{name}.npy")) for name in fields)), []
    segment = shm.segment_name(os.getpid(), token, "data")
    return config, sources.publish(fields, segment), [segment]


def _check_pipeline(config: Config, maker: BatchMaker) -> None:
    """Make batch (epoch 0, index 0) here: refuses pipelines that fail, and warms the numba
    cache for the workers. The layout does not come from it: each op declares its output."""
    try:
        maker.make(0, 0, maker.empty_batch(), config.streaming_stores)
    except SampleError as exc:
        raise ConfigError(f"the augmentation pipeline failed on batch (epoch 0, index 0), "
                          f"sample {exc.sample}: {exc}\n{exc.trace}") from exc
    except Exception as exc:
        raise ConfigError(f"the augmentation pipeline failed on batch (epoch 0, index 0): "
                          f"{type(exc).__name__}: {exc}") from exc


def _stop_on_signals() -> dict:
    stop = {"flag": False}

    def request_stop(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def run_server(config: Config, source: sources.SourceRef | None = None, on_ready=None) -> None:
    """Serve until SIGTERM/SIGINT. ``source`` overrides ``config.data`` (already published arrays)."""
    stop = _stop_on_signals()
    fd_limit = raise_fd_limit()
    ensure_runtime_dir()
    _refuse_if_running(config.name)
    removed = shm.remove_stale()
    if removed:
        log.info("removed stale segments of dead servers: %s", removed)
    server = _Server(config, source, on_ready)
    try:
        server.start(fd_limit)
        server.broker.run(lambda: server.should_stop(stop["flag"]))
        log.info("stopping")
        if server.broker.failure is not None:
            raise ServiceFailed(server.broker.failure)
    finally:
        server.close()


class _Server:
    """One server's resources, made in start-up order; ``close`` releases them in the shutdown
    protocol's order (steps 2-4), however far start-up got."""

    def __init__(self, config: Config, source: sources.SourceRef | None, on_ready):
        self.config, self.source, self.on_ready = config, source, on_ready
        self.token = secrets.token_hex(4)
        self.owned: list[str] = []  # segments to unlink
        self.made_files: dict[Path, shm.FileId] = {}  # the ipc socket and the state file, to unlink if still ours
        self.frontend = self.pool = self.ring = self.broker = self.authenticator = self.guard = None
        self.exporter = None  # the Prometheus endpoint, with metrics_port
        self.started = time.monotonic()

    def start(self, fd_limit: int) -> None:
        if self.source is None:
            self.config, self.source, self.owned = prepare_source(self.config, self.token)
        config = self.config
        maker = BatchMaker(replace(config, private_data=False), self.source)  # workers make the copies
        self.layout = plan_layout(shm.segment_name(os.getpid(), self.token, "ring"), config.slots,
                                  {name: ((config.batch_size, *shape), dtype)
                                   for name, (shape, dtype) in maker.pipeline.out_fields.items()})
        _check_pipeline(config, maker)
        self.ring = Ring(self.layout, create=True)
        self.owned.append(self.layout.segment)
        housekeeping = self._open_frontend(fd_limit)
        spec = WorkerSpec(0, config, self.source, self.layout, os.getpid(), self.ring.file_id)
        self.pool = WorkerPool(spec, config.worker_processes, config.max_worker_restarts)
        self.broker = Broker(config, self.ring, self.pool, self.frontend, self._welcome(maker), self._ready,
                             housekeeping=housekeeping, watched={self.guard.monitor: self.guard.handle})
        if self.exporter is not None:
            self.broker.status_extra["metrics_url"] = self.exporter.url

    def _welcome(self, maker: BatchMaker) -> dict:
        config = self.config
        return {
            "layout": self.layout.to_json(), "structure": config.structure.to_json(),
            "batch_size": config.batch_size, "steps_per_epoch": maker.sampler.steps_per_epoch,
            "samples": maker.samples, "heartbeat_s": config.heartbeat_s, "ordered": config.ordered,
            "server_pid": os.getpid(),
        }

    def _open_frontend(self, fd_limit: int) -> list:
        """The client socket (bound only once the workers are ready) and its guards; returns the
        housekeeping they need every tick."""
        config = self.config
        self.frontend = frontend = zmq.Context.instance().socket(zmq.ROUTER)
        frontend.setsockopt(zmq.LINGER, 0)
        frontend.setsockopt(zmq.MAXMSGSIZE, MAX_CLIENT_FRAME_BYTES)
        frontend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.guard = ConnectionGuard(frontend, config.max_connections or default_max_connections(fd_limit),
                                     config.max_inbound_bytes_per_s)
        housekeeping = [self.guard.report_refusals, self.guard.check_inbound]
        if config.curve_secret_key:
            self.authenticator, keys = secure_frontend(zmq.Context.instance(), frontend, config.curve_secret_key,
                                                       config.curve_authorized_keys)
            housekeeping.append(keys.refresh)
        if config.metrics_port is not None:
            from .prometheus import MetricsServer  # prometheus_client is imported only when asked for

            self.exporter = MetricsServer(config.metrics_host, config.metrics_port)
            housekeeping.append(lambda: self.exporter.refresh(self.broker.status))
        return housekeeping

    def _ready(self) -> None:
        """Every worker said hello: bind the endpoint, write the state file, tell the caller."""
        config = self.config
        _refuse_if_running(config.name)  # binding an ipc path takes it over from whoever has it
        umask = os.umask(0o177)  # an ipc socket is born owner-only (0600), never briefly wider
        try:
            self.frontend.bind(config.endpoint)
        finally:
            os.umask(umask)
        ipc = ipc_socket_path(config.endpoint)
        if ipc is not None:
            self.made_files[ipc] = _file_id(ipc)
        if config.endpoint.startswith("tcp://") and not config.curve_secret_key:
            log.warning("listening on %s without CURVE: %s can read the batches (see ringfeed keys)",
                        config.endpoint, cleartext_readers(config.endpoint))
        path = state_file(config.name)
        self.made_files[path] = _write_state(path, {"pid": os.getpid(), "endpoint": config.endpoint,
                                                    "name": config.name})
        log.info("ready: %d workers, %d slots of %.1f MiB, endpoint %s, at most %d connections (%.1f s)",
                 config.worker_processes, self.layout.slots, self.layout.slot_bytes / 2**20, config.endpoint,
                 self.guard.max_connections, time.monotonic() - self.started)
        if self.on_ready is not None:
            self.on_ready(config.endpoint)

    def should_stop(self, stop_requested: bool) -> bool:
        if not self.broker.is_ready and time.monotonic() - self.started > self.config.start_timeout_s:
            raise TimeoutError(f"workers were not ready within start_timeout_s={self.config.start_timeout_s}")
        return stop_requested

    def close(self) -> None:
        if self.broker is not None:
            self.broker.stop_workers()
        if self.pool is not None:
            self.pool.stop()
        for closable in (self.guard, self.exporter):
            if closable is not None:
                closable.close()
        if self.frontend is not None:
            self.frontend.close(0)
        if self.authenticator is not None:
            self.authenticator.stop()
        for segment in self.owned:
            shm.unlink(segment)
        if self.ring is not None:
            self.ring.close()
        for path, file_id in self.made_files.items():
            if path != state_file(self.config.name) or _names_us(path):  # rewritten in place, it keeps its inode
                _unlink_if_ours(path, file_id)


def _child_main(config: Config, source, conn, parent_pid: int) -> None:
    # A session of its own (its workers join it): a Ctrl-C to the trainer's process group leaves
    # the loader running for a trainer that catches it; the owner stops it, or its exit does.
    os.setsid()
    die_with_parent(parent_pid)  # a Service's server must not outlive the script that started it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run_server(config, source, on_ready=lambda endpoint: conn.send(("ready", endpoint)))
    except BaseException as exc:
        conn.send(("error", type(exc).__name__, str(exc), traceback.format_exc()))
        raise SystemExit(1) from None


class Service:
    """A ringfeed server in a child process, for notebooks, scripts and tests.

    ``Service(config, fields={"image": X, "label": y, ...})`` takes in-memory
    arrays, one per field (copied once into a shared data segment);
    ``features=``/``labels=`` are the two-field case. Without either it uses
    ``config.data``. Use it as a context manager; ``start`` returns once the
    workers are warm. The server runs in a session of its own, so a Ctrl-C
    (SIGINT to the caller's process group) does not reach it; it stops on
    ``stop()`` or when its owner exits.
    """

    def __init__(self, config: Config | None = None, *, fields: dict | None = None, features=None, labels=None,
                 **options):
        self.config = (config or Config()).with_overrides(**options)
        if fields is not None and (features is not None or labels is not None):
            raise ConfigError("give fields= or features=/labels=, not both")
        if features is not None or labels is not None:
            fields = {"features": np.asarray(features), "labels": np.asarray(labels)}
        if fields is not None and not isinstance(fields, dict):
            raise ConfigError(f"fields must be a dict of field name -> numpy array, got {type(fields).__name__}")
        self._fields = fields
        self._proc = None
        self._segments: list[str] = []

    @property
    def endpoint(self) -> str:
        return self.config.endpoint

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> "Service":
        source = None
        if self._fields is not None:
            self.config = sources.with_default_roles(self.config, self._fields)
            sources.validate_for(self.config, self._fields)
            used = {name: self._fields[name] for name in self.config.structure.names}
            segment = shm.segment_name(os.getpid(), secrets.token_hex(4), "data")
            source = sources.publish(used, segment)
            self._segments.append(segment)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child_main, args=(self.config, source, child, os.getpid()),
                                 name=f"ringfeed-server-{self.config.name}", daemon=False)
        self._proc.start()
        child.close()
        deadline = time.monotonic() + self.config.start_timeout_s + STOP_TIMEOUT_S
        while not parent.poll(0.2):
            if not self._proc.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ringfeed server {self.config.name!r} did not start "
                                   f"(exit code {self._proc.exitcode if self._proc else None})")
        try:
            message = parent.recv()
        except EOFError:
            message = ("error", "RuntimeError", f"ringfeed server {self.config.name!r} exited during start-up")
        if message[0] == "error":
            self.stop()
            error = ConfigError if message[1] == "ConfigError" else RuntimeError
            raise error(message[2])
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.is_alive():
                proc.terminate()
                proc.join(STOP_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join(STOP_TIMEOUT_S)
            proc.close()
        for segment in self._segments:
            shm.unlink(segment)
        self._segments.clear()
        shm.remove_stale()

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
