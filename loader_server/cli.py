"""The ``ringfeed`` command: serve, start, stop, status, cleanup, keys, pack, demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from importlib import metadata

from ringfeed.paths import check_endpoint, check_name, default_endpoint
from ringfeed.status import STATUS_TIMEOUT_S, query_status

from . import background, shm, status_view
from .config import (AUTO_WORKERS, ON_ERROR_MODES, SAMPLING_MODES, Config, ConfigError, default_text, from_mapping,
                     load_config)

def workers_flag(text: str) -> int | str:
    """``--workers``: a count, or ``auto``."""
    if text == AUTO_WORKERS:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or {AUTO_WORKERS!r}, got {text!r}") from None


# Config options that have a flag (their metadata names it), flag -> (Config field, type). Flags
# win over the TOML file, so they have no argparse default: each help is the option's doc and
# default from Config's metadata, the text the README's reference table shows.
FLAG_TYPES = {"workers": workers_flag}
SERVE_FLAGS = {option.metadata["flag"]: (option.name, FLAG_TYPES.get(option.name,
                                                                     int if option.type.startswith("int") else str))
               for option in dataclasses.fields(Config) if option.metadata["flag"]}
CHOICES = {"sampling": SAMPLING_MODES, "on_error": ON_ERROR_MODES}
PATH_OPTIONS = ("data", "curve_secret_key", "curve_authorized_keys")  # files a config names
WATCH_INTERVAL_S = 1.0  # status --watch: seconds between refreshes


def config_option(field: str) -> dataclasses.Field:
    return next(option for option in dataclasses.fields(Config) if option.name == field)


def config_default(field: str) -> str:
    """The default of Config option ``field``, as a flag's help states it."""
    return default_text(config_option(field), markdown=False)


def config_help(field: str) -> str:
    """A serve flag's help: the option's doc, then its default."""
    return f"{config_option(field).metadata['doc'].replace('`', '')} (default: {config_default(field)})"


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="a TOML file, whose keys mirror the flags (batch_size, "
                        "...), or the .json resolved config that start writes; flags win over it (default: "
                        "none, only flags)")
    for flag, (field, kind) in SERVE_FLAGS.items():
        parser.add_argument(flag, dest=field, type=kind, choices=CHOICES.get(field), help=config_help(field))


def _config_from(args: argparse.Namespace) -> Config:
    overrides = {field: getattr(args, field) for field, _ in SERVE_FLAGS.values()}
    if args.config:
        return load_config(args.config, **overrides)
    return from_mapping({k: v for k, v in overrides.items() if v is not None})


def _absolute(config: Config) -> Config:
    """``config`` with its files named from the root: a background server resolves nothing
    against the caller's folder."""
    paths = {field: os.path.abspath(getattr(config, field)) for field in PATH_OPTIONS
             if getattr(config, field) is not None}
    return dataclasses.replace(config, **paths)


def _checked_name(args: argparse.Namespace) -> str:
    """``--name`` (default ``default``), refused before any file is read or process signalled."""
    try:
        return check_name(args.name or "default")
    except ValueError as exc:
        raise ConfigError(f"--name: {exc}") from None


def _checked_endpoint(endpoint: str) -> str:
    try:
        return check_endpoint(endpoint)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def cmd_serve(args) -> int:
    from .service import ServiceFailed, run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run_server(_config_from(args))
    except ServiceFailed as exc:
        print(f"ringfeed: the service failed: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_start(args) -> int:
    config = _absolute(_config_from(args))  # bad flags are refused here, before detaching
    state = background.start(config, config.start_timeout_s)
    print(f"ringfeed {config.name!r} started: pid {state['pid']}, endpoint {state['endpoint']}, "
          f"log {state['log']}")
    return 0


def cmd_stop(args) -> int:
    name = background.name_at(_checked_endpoint(args.endpoint)) if args.endpoint else _checked_name(args)
    pid = background.stop(name)
    print(f"ringfeed {name!r} stopped (pid {pid})" if pid else f"ringfeed {name!r} is not running")
    return 0


def cmd_status(args) -> int:
    name = _checked_name(args)
    endpoint = args.endpoint
    if endpoint is None:
        state = background.read_state(name)
        endpoint = state["endpoint"] if state else default_endpoint(name)
    try:
        status = query_status(_checked_endpoint(endpoint), args.timeout_s, args.curve_server_key,
                              args.curve_secret_key)
    except ValueError as exc:  # a connect that zmq refuses
        raise ConfigError(str(exc)) from None
    if args.json and args.watch:
        raise ConfigError("--watch redraws the text status; it does not go with --json")
    if args.watch and not args.interval_s >= status_view.MIN_INTERVAL_S:
        raise ConfigError(f"--interval-s must be at least {status_view.MIN_INTERVAL_S}, got {args.interval_s!r}")
    if args.json:
        print(json.dumps({"running": status is not None, "endpoint": endpoint, **(status or {})}))
    elif status is None:
        print(f"ringfeed {name!r}: not running (nothing answered at {endpoint})")
    else:
        return _show_status(args, endpoint, status)
    if status is None:
        return 1
    return 0 if status["ready"] else 3


def _show_status(args, endpoint: str, status: dict) -> int:
    """The text status once, or redrawn every ``--interval-s`` with ``--watch``."""
    try:
        if args.watch:
            return status_view.watch(lambda: query_status(endpoint, args.timeout_s, args.curve_server_key,
                                                          args.curve_secret_key), args.interval_s, sys.stdout)
        print(status_view.render(status))
    except ValueError as exc:  # a reply that is not a status (StatusError, ProtocolError)
        print(f"ringfeed: error: {exc}", file=sys.stderr)
        return 2
    return 0 if status["ready"] is True else 3


def cmd_cleanup(args) -> int:
    removed = shm.remove_stale()
    print(f"removed {len(removed)} stale segment(s)" + "".join(f"\n  /dev/shm/{n}" for n in removed))
    return 0


def cmd_keys(args) -> int:
    from .auth import generate_keys

    paths = generate_keys(args.dir)
    print(f"server:  --curve-secret-key {paths['server_secret']} "
          f"--curve-authorized-keys {paths['authorized']}\n"
          f"client:  Feed(endpoint, curve_server_key={paths['server_public']!r}, "
          f"curve_secret_key={paths['client_secret']!r})\n"
          f"more clients: copy their public .key files into {paths['authorized']}")
    return 0


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes} bytes"


def cmd_pack(args) -> int:
    from .pack import pack
    from .packfile import PackError

    try:
        stats = pack(args.src, args.out, max_side=args.max_side, reencode_png=args.reencode_png,
                     progress=not args.no_progress)
    except PackError as exc:
        raise ConfigError(str(exc)) from None
    except KeyboardInterrupt:
        print(f"ringfeed: pack interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    reencoded = f", {stats['reencoded']:,} re-encoded" if stats["reencoded"] else ""
    print(f"packed {stats['samples']:,} samples into {args.out}: {_size(stats['bytes'])} "
          f"in {stats['seconds']:.1f} s{reencoded}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(epochs=args.epochs, workers=args.workers, use_tf_dataset=args.tf_dataset)
    return 0 if result["val_accuracy"] >= 0.9 else 1


def _add_status_command(sub) -> None:
    p = sub.add_parser("status", help="show slots, batches served, samples/s and workers")
    p.add_argument("--name", help=f"the service to ask (default: {config_default('name')})")
    p.add_argument("--endpoint", help="ask the server here: ipc://PATH or tcp://HOST:PORT (default: "
                   "the endpoint in the state file of --name, else its ipc endpoint)")
    p.add_argument("--json", action="store_true", help="print the counters as one JSON object")
    p.add_argument("--watch", action="store_true", help="redraw the text status in place every "
                   "--interval-s until Ctrl-C (exit 0) or the server goes away (exit 1)")
    p.add_argument("--interval-s", type=float, default=WATCH_INTERVAL_S, metavar="S",
                   help="seconds between --watch refreshes (default: %(default)s s)")
    p.add_argument("--timeout-s", type=float, default=STATUS_TIMEOUT_S, metavar="S",
                   help="how long to wait for an answer (default: %(default)s s)")
    p.add_argument("--curve-server-key", help="the server's public key file, for a CURVE server "
                   "(default: none, a server without CURVE)")
    p.add_argument("--curve-secret-key", help="an authorised client's secret key file, for a CURVE "
                   "server (default: none)")
    p.set_defaults(fn=cmd_status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringfeed", description="A shared-memory data-loading service "
                                     "that feeds Keras model.fit from numba workers.")
    parser.add_argument("--version", action="version", version=f"ringfeed {metadata.version('ringfeed')}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_text in (("serve", cmd_serve, "run the server in the foreground"),
                                ("start", cmd_start, "start the server in the background")):
        p = sub.add_parser(name, help=help_text)
        _add_serve_options(p)
        p.set_defaults(fn=fn)
    p = sub.add_parser("stop", help="stop a background server")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--name", help=f"the service to stop (default: {config_default('name')})")
    which.add_argument("--endpoint", help="stop the running service that listens here, found through "
                       "the state files (default: the one --name says)")
    p.set_defaults(fn=cmd_stop)
    _add_status_command(sub)
    p = sub.add_parser("cleanup", help="remove shared memory left by servers that died")
    p.set_defaults(fn=cmd_cleanup)
    p = sub.add_parser("keys", help="generate CURVE keys for a server and a client")
    p.add_argument("dir", help="folder for the key files")
    p.set_defaults(fn=cmd_keys)
    p = sub.add_parser("pack", help="pack an image folder, list file, .npy folder or .npz into one "
                       "random-access file that workers memory-map")
    p.add_argument("src", help="an image folder (one subfolder per class), a .csv list file of "
                   "path,label rows, a folder of .npy fields, or an .npz")
    p.add_argument("out", help="the pack file to write (replaced only once it is complete)")
    p.add_argument("--max-side", type=int, default=None, metavar="N",
                   help="re-encode images whose longer side exceeds N as JPEG quality 90, resized "
                   "so that side is N; smaller images are stored unchanged (default: store every "
                   "image unchanged)")
    p.add_argument("--reencode-png", action="store_true",
                   help="re-encode PNGs as JPEG quality 90 (RGB) (default: keep their bytes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: one on stderr, with "
                   "the rate and the time left)")
    p.set_defaults(fn=cmd_pack)
    p = sub.add_parser("demo", help="train a small convnet on scikit-learn's digits through ringfeed")
    p.add_argument("--epochs", type=int, default=8, help="epochs to train (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: the number of cores)")
    p.add_argument("--tf-dataset", action="store_true", help="feed model.fit through as_tf_dataset() "
                   "(default: the generator)")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, background.BackgroundError) as exc:
        print(f"ringfeed: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
