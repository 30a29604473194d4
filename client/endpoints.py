"""Endpoint lists and patterns, as ``ringfeed.open_feed(...)`` and ``RINGFEED_ENDPOINT`` take them.

``"tcp://a:5555,tcp://b:5555"`` is two endpoints; ``{first..last}`` in one
expands to each number in turn, so a trainer follows a StatefulSet's replica
count with one number::

    expand_endpoints("tcp://ringfeed-loader-{0..2}.ringfeed-loader:5555")
    # ["tcp://ringfeed-loader-0.ringfeed-loader:5555", ..., "tcp://ringfeed-loader-2.ringfeed-loader:5555"]

The order is the fan-in's (server i serves shard (i, n)), so it is kept: the
entries in the order written, each range counting up. A string with neither a
comma nor a brace is one endpoint, returned as it is.
"""

from __future__ import annotations

import re

from .paths import check_endpoint

MAX_ENDPOINTS = 1024  # far past any fan-in; it bounds what a typo like {0..99999999} can build
RANGE = re.compile(r"\{(\d{1,6})\.\.(\d{1,6})\}")
EXAMPLE = "tcp://ringfeed-loader-{0..2}.ringfeed-loader:5555"


def is_pattern(text: str) -> bool:
    """Whether ``text`` is a list or pattern rather than one endpoint."""
    return "," in text or "{" in text or "}" in text


def expand_endpoints(text: str) -> list[str]:
    """The endpoints ``text`` names, in order; ``ValueError`` naming the part that is wrong."""
    if not isinstance(text, str):
        raise TypeError(f"endpoints must be a string, got {type(text).__name__}")
    if not is_pattern(text):
        return [text]
    out: list[str] = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            raise ValueError(f"endpoint list {text!r} has an empty entry; expected comma-separated "
                             f"endpoints such as tcp://a:5555,tcp://b:5555")
        out += _expand_entry(entry)
        if len(out) > MAX_ENDPOINTS:
            raise ValueError(f"endpoint list {text!r} names more than {MAX_ENDPOINTS} endpoints")
    return [check_endpoint(endpoint) for endpoint in out]


def _expand_entry(entry: str) -> list[str]:
    ranges = list(RANGE.finditer(entry))
    if len(ranges) > 1:
        raise ValueError(f"endpoint pattern {entry!r} has {len(ranges)} ranges; expected at most one, "
                         f"as in {EXAMPLE}")
    rest = RANGE.sub("", entry)
    if "{" in rest or "}" in rest:
        raise ValueError(f"endpoint pattern {entry!r}: a brace that is not a {{first..last}} range of "
                         f"numbers; expected e.g. {EXAMPLE}")
    if not ranges:
        return [entry]
    match = ranges[0]
    first, last = int(match.group(1)), int(match.group(2))
    if first > last:
        raise ValueError(f"endpoint pattern {entry!r}: range {{{first}..{last}}} counts down; "
                         f"expected first <= last")
    if last - first + 1 > MAX_ENDPOINTS:
        raise ValueError(f"endpoint pattern {entry!r} names more than {MAX_ENDPOINTS} endpoints")
    head, tail = entry[:match.start()], entry[match.end():]
    return [f"{head}{i}{tail}" for i in range(first, last + 1)]
