"""ringfeed: batches from a ringfeed server for ``model.fit``, ``tf.data`` and PyTorch loops.

This package is the client, and ``ringfeed.server`` the server. The client's modules never
import the server, nor numba; TensorFlow only in the tf.data adapter, PyTorch only for
``torch_generator()`` and ``pin_memory``. The server's front names (``Config``, ``Service``
...) are offered here too, for ``from ringfeed import Config, Feed, Service``, and imported
only when first asked for.
"""

from .endpoints import expand_endpoints
from .errors import PinMemoryError, RemoteWorkerError, RingfeedError, ServerGoneError
from .fanin import FanInFeed
from .feed import Feed
from .spec import FeedSpec, FieldSpec

SERVER_NAMES = ("Config", "ConfigError", "Service", "load_config", "load_toml", "run_server")
__all__ = ["FanInFeed", "Feed", "FeedSpec", "FieldSpec", "PinMemoryError", "RemoteWorkerError", "RingfeedError",
           "ServerGoneError", "open_feed", *SERVER_NAMES]


def __getattr__(name: str):
    if name in SERVER_NAMES:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_feed(endpoint: str | list[str] | None = None, **options) -> Feed | FanInFeed:
    """A ``Feed`` for one endpoint (``None``: the local service ``name``), a ``FanInFeed`` for a
    list, a comma-separated string or a pattern that names several, such as
    ``tcp://ringfeed-loader-{0..2}.ringfeed-loader:5555`` (``client/endpoints.py``); ``options``
    are theirs."""
    if isinstance(endpoint, (list, tuple)):
        return FanInFeed(list(endpoint), **options)
    endpoints = expand_endpoints(endpoint) if endpoint else [endpoint]
    if len(endpoints) > 1:
        return FanInFeed(endpoints, **options)
    return Feed(endpoints[0], **options)
