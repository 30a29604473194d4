"""ringfeed's client: batches from a ringfeed server for ``model.fit`` and ``tf.data``.

Imports neither numba nor ``loader_server``; TensorFlow only in the tf.data adapter, and
PyTorch only for ``torch_generator()`` and ``pin_memory``.
"""

from .errors import PinMemoryError, RemoteWorkerError, RingfeedError, ServerGoneError
from .feed import Feed, FeedSpec, FieldSpec

__all__ = ["Feed", "FeedSpec", "FieldSpec", "PinMemoryError", "RemoteWorkerError", "RingfeedError", "ServerGoneError"]
