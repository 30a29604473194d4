"""The text ``ringfeed status`` (``render``) and its live view, ``ringfeed status --watch``.

A status reply comes from a socket, so nothing in it is trusted: every figure
read is checked for its type (``StatusError`` names the one that is wrong), and
strings are shown with control characters escaped, so a reply cannot move the
cursor or recolour the terminal.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ringfeed.layout import DTYPE_SIZES

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen: each refresh draws in place
MIN_INTERVAL_S = 0.1
NUMBER = (int, float)
_DTYPE_NAMES = {spelling: np.dtype(spelling).name for spelling in DTYPE_SIZES}  # only these are shown by name


class StatusError(ValueError):
    """A status reply without a figure the view shows, or with one of the wrong type."""


def _get(status: dict, key: str, kind, optional: bool = False):
    value = status.get(key)
    if value is None and optional:
        return None
    if (isinstance(value, bool) and kind is not bool or not isinstance(value, kind)
            or isinstance(value, float) and not math.isfinite(value)):
        raise StatusError(f"status reply: {key!r} should be {_kind_name(kind)}, got {value!r:.80}")
    return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _text(value) -> str:
    """``value`` as printable text: control characters (ANSI escapes among them) escaped."""
    text = str(value)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _share(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _seconds(value) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _fields(status: dict) -> str:
    parts = []
    for item in _get(status, "fields", list):
        if not isinstance(item, dict):
            raise StatusError(f"status reply: 'fields' should list objects, got {item!r:.80}")
        shape = _get(item, "shape", list)
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
            raise StatusError(f"status reply: a field's shape should list integers, got {shape!r:.80}")
        dtype = _get(item, "dtype", str)
        dtype = _DTYPE_NAMES.get(dtype, dtype)
        parts.append(f"{_text(_get(item, 'name', str))} {tuple(shape)} {_text(dtype)}")
    return "; ".join(parts)




def _workers(status: dict) -> list[str]:
    auto = ""
    if _get(status, "workers_auto", bool, optional=True):
        auto = f", {_get(status, 'workers_active', int)} active (workers = auto)"
    lines = [f"  workers        {_get(status, 'workers', int)}/{_text(status.get('workers_configured'))} "
             f"(restarts {_get(status, 'worker_restarts', int)}){auto}"]
    for item in _get(status, "per_worker", list):
        if not isinstance(item, dict):
            raise StatusError(f"status reply: 'per_worker' should list objects, got {item!r:.80}")
        pid = _get(item, "pid", int, optional=True)
        state = "" if _get(item, "ready", bool) else "  (starting)"
        lines.append(f"    worker {_get(item, 'worker', int):<3}  pid {pid if pid is not None else '-':<8} "
                     f"busy {_share(_get(item, 'busy_share', NUMBER)):>4}  "
                     f"batch {_seconds(_get(item, 'batch_s', NUMBER, optional=True))}{state}")
    return lines


def render(status: dict) -> str:
    """``status`` (a server's status reply) as the lines ``ringfeed status`` prints."""
    if not isinstance(status, dict):
        raise StatusError(f"status reply should be an object, got {type(status).__name__}")
    head = f"ringfeed {_text(repr(_get(status, 'name', str)))} at {_text(_get(status, 'endpoint', str))}"
    if not _get(status, "ready", bool):
        return f"{head}: not ready: {_text(_get(status, 'failure', str, optional=True) or 'workers are starting')}"
    slots = _get(status, "slots", dict)
    occupancy = ", ".join(f"{_get(slots, state, int)} {state}" for state in ("free", "filling", "ready", "leased"))
    pipeline = [_text(op) for op in _get(status, "pipeline", list)]
    data = _get(status, "data", str, optional=True)
    window_s = _get(status, "metrics_window_s", NUMBER)
    return "\n".join([
        head,
        f"  data           {_text(data) if data is not None else 'in-memory arrays'}",
        f"  batch size     {_get(status, 'batch_size', int)} "
        f"({_get(status, 'steps_per_epoch', int)} batches per epoch)",
        f"  fields         {_fields(status)}",
        f"  pipeline       {', '.join(pipeline) or 'none'}",
        f"  uptime         {_duration(_get(status, 'uptime_s', NUMBER))}",
        f"  samples/s      {_get(status, 'samples_per_s_window', NUMBER):,.0f} over the last {window_s:.0f} s, "
        f"{_get(status, 'samples_per_s_since_start', NUMBER):,.0f} since start",
        f"  ring dry       {_share(_get(status, 'ring_dry_share', NUMBER, optional=True))} of the last "
        f"{window_s:.0f} s with a client (it had read every batch sent and waited for more)",
        f"  slots          {_get(slots, 'total', int)}: {occupancy}",
        *_workers(status),
        f"  clients        {_get(status, 'clients', int)}",
        f"  batches served {_get(status, 'batches_served', int):,}",
        f"  skipped        {_get(status, 'samples_skipped', int):,} samples",
    ])


def watch(query, interval_s: float, out) -> int:
    """Redraw ``render(query())`` on ``out`` every ``interval_s`` until Ctrl-C (0) or until
    ``query`` returns None, the server gone (1). ``query`` bounds its own wait."""
    if not interval_s >= MIN_INTERVAL_S:
        raise ValueError(f"--interval-s must be at least {MIN_INTERVAL_S}, got {interval_s!r}")
    try:
        while True:
            status = query()
            if status is None:
                out.write("\nringfeed: the server went away (nothing answered); stopped watching\n")
                out.flush()
                return 1
            out.write(f"{CLEAR}{render(status)}\n\n(refreshing every {interval_s:g} s; Ctrl-C to stop)\n")
            out.flush()
            time.sleep(interval_s)
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        return 0
