"""The ``ringfeed`` command: serve, start, stop, status, cleanup, keys, pack, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from client.paths import check_name, default_endpoint
from client.status import query_status

from . import background, shm
from .config import Config, ConfigError, from_mapping, load_toml

# flag -> Config field; flags win over the TOML file
SERVE_FLAGS = {
    "--data": ("data", str),
    "--batch-size": ("batch_size", int),
    "--workers": ("workers", int),
    "--slots": ("slots", int),
    "--seed": ("seed", int),
    "--sampling": ("sampling", str),
    "--endpoint": ("endpoint", str),
    "--steps-per-epoch": ("steps_per_epoch", int),
    "--on-error": ("on_error", str),
    "--curve-secret-key": ("curve_secret_key", str),
    "--curve-authorized-keys": ("curve_authorized_keys", str),
}
# flags naming files: made absolute before they reach a server, which resolves nothing against its cwd
PATH_FLAGS = ("--config", "--data", "--curve-secret-key", "--curve-authorized-keys")


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file; its keys mirror the flags (batch_size, ...)")
    for flag, (field, kind) in SERVE_FLAGS.items():
        parser.add_argument(flag, dest=field, type=kind)
    parser.add_argument("--name", default=None, help="service name, for several services per host")


def _config_from(args: argparse.Namespace) -> Config:
    overrides = {field: getattr(args, field) for field, _ in SERVE_FLAGS.values()}
    overrides["name"] = args.name
    if args.config:
        return load_toml(args.config, **overrides)
    return from_mapping({k: v for k, v in overrides.items() if v is not None})


def _serve_argv(args: argparse.Namespace) -> list[str]:
    flags = {"--config": args.config}
    flags.update((flag, getattr(args, field)) for flag, (field, _) in SERVE_FLAGS.items())
    argv = []
    for flag, value in flags.items():
        if value is not None:
            argv += [flag, os.path.abspath(value) if flag in PATH_FLAGS else str(value)]
    return argv + (["--name", args.name] if args.name else [])


def _checked_name(args: argparse.Namespace) -> str:
    """``--name`` (default ``default``), refused before any file is read or process signalled."""
    try:
        return check_name(args.name or "default")
    except ValueError as exc:
        raise ConfigError(f"--name: {exc}") from None


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
    config = _config_from(args)  # refuse bad flags here, before detaching
    state = background.start(_serve_argv(args), config.name, config.start_timeout_s)
    print(f"ringfeed {config.name!r} started: pid {state['pid']}, endpoint {state['endpoint']}, "
          f"log {state['log']}")
    return 0


def cmd_stop(args) -> int:
    name = _checked_name(args)
    pid = background.stop(name)
    print(f"ringfeed {name!r} stopped (pid {pid})" if pid else f"ringfeed {name!r} is not running")
    return 0


def cmd_status(args) -> int:
    name = _checked_name(args)
    endpoint = args.endpoint
    if endpoint is None:
        state = background.read_state(name)
        endpoint = state["endpoint"] if state else default_endpoint(name)
    status = query_status(endpoint, args.timeout_s, args.curve_server_key, args.curve_secret_key)
    if args.json:
        print(json.dumps({"running": status is not None, "endpoint": endpoint, **(status or {})}))
    elif status is None:
        print(f"ringfeed {name!r}: not running (nothing answered at {endpoint})")
    elif not status["ready"]:
        print(f"ringfeed {status['name']!r} at {status['endpoint']}: not ready: "
              f"{status.get('failure') or 'workers are starting'}")
    else:
        slots = status["slots"]
        print(f"ringfeed {status['name']!r} at {status['endpoint']}\n"
              f"  workers        {status['workers']}/{status['workers_configured']} "
              f"(restarts {status['worker_restarts']})\n"
              f"  slots          {slots['total']}: {slots['free']} free, {slots['filling']} filling, "
              f"{slots['ready']} ready, {slots['leased']} leased\n"
              f"  clients        {status['clients']}\n"
              f"  batches served {status['batches_served']}\n"
              f"  samples/s      {status['samples_per_s']:.0f}")
    if status is None:
        return 1
    return 0 if status["ready"] else 3


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringfeed", description="A shared-memory data-loading service "
                                     "that feeds Keras model.fit from numba workers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_text in (("serve", cmd_serve, "run the server in the foreground"),
                                ("start", cmd_start, "start the server in the background")):
        p = sub.add_parser(name, help=help_text)
        _add_serve_options(p)
        p.set_defaults(fn=fn)
    p = sub.add_parser("stop", help="stop a background server")
    p.add_argument("--name")
    p.set_defaults(fn=cmd_stop)
    p = sub.add_parser("status", help="show slots, batches served, samples/s and workers")
    p.add_argument("--name")
    p.add_argument("--endpoint")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout-s", type=float, default=2.0)
    p.add_argument("--curve-server-key", help="the server's public key file, for a CURVE server")
    p.add_argument("--curve-secret-key", help="an authorised client's secret key file")
    p.set_defaults(fn=cmd_status)
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
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--tf-dataset", action="store_true", help="feed model.fit through as_tf_dataset()")
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
