"""throughput.py's ringfeed contenders: a feed of its own service each, read through
``generator()`` or ``as_tf_dataset()``, on the standard, private-data, plain-stores,
multi-field and python-op services.
"""

from __future__ import annotations

import benchlib
from benchlib import BATCH, CROP, IMAGE, META
from throughput_contenders import Contender, check_batch, described


class RingfeedGenerator(Contender):
    """A feed of its own service, open for the whole run: an idle feed holds slots of its
    service, so feeds never share one."""

    group = "ringfeed"

    def __init__(self, endpoint: str, workers: int):
        super().__init__(*benchlib.ringfeed_contender("generator", workers), workers)
        self.endpoint = endpoint

    def start(self, warmup: int) -> None:
        from ringfeed import Feed

        self.feed = Feed(self.endpoint)
        self.it = self.batches()
        super().start(warmup)

    def batches(self):
        return self.feed.generator()

    def pull(self):
        return next(self.it)[0]

    def stop(self) -> None:
        self.it = None  # stop TensorFlow's reader, if any, before the feed closes
        self.feed.close()


class RingfeedPrivate(RingfeedGenerator):
    """The generator of a service whose workers read their own copies of the dataset
    (``private_data``), in transparent huge pages."""

    @staticmethod
    def named(workers: int) -> str:
        return f"ringfeed-private-generator-w{workers}"

    def __init__(self, endpoint: str, workers: int):
        super().__init__(endpoint, workers)
        self.name = self.named(workers)
        self.label = f"ringfeed generator(), {workers} workers, private_data"


class RingfeedPlainStores(RingfeedGenerator):
    """The generator of a service whose workers write slots with plain stores
    (``streaming_stores = false``): what streaming stores save."""

    def __init__(self, endpoint: str, workers: int):
        super().__init__(endpoint, workers)
        self.name = f"ringfeed-plain-stores-generator-w{workers}"
        self.label = f"ringfeed generator(), {workers} workers, plain stores"


class RingfeedTfDataset(RingfeedGenerator):
    def __init__(self, endpoint: str, workers: int):
        super().__init__(endpoint, workers)
        self.name, self.label = benchlib.ringfeed_contender("tf-dataset", workers)

    def batches(self):
        return iter(self.feed.as_tf_dataset())


class RingfeedMultiField(RingfeedGenerator):
    """The generator of a service with four fields: x = {"features", "meta"}, y = labels and
    w = weight (``MULTI_FIELD``); the numba ops run on features, the rest is gathered."""

    def __init__(self, endpoint: str, workers: int):
        super().__init__(endpoint, workers)
        self.name = f"ringfeed-multi-field-generator-w{workers}"
        self.label = f"ringfeed generator(), {workers} workers, x: image + meta ({META},), sample_weight"

    def start(self, warmup: int) -> None:
        from ringfeed import Feed

        self.feed = Feed(self.endpoint)
        self.it = self.batches()
        x, y, w = next(self.it)
        check_batch(self.name, x)
        self.delivered = described(x=x, y=y, w=w)
        want = {"x.features": [[BATCH, *CROP, IMAGE[2]], "float32"], "x.meta": [[BATCH, META], "float32"],
                "y": [[BATCH], "int64"], "w": [[BATCH], "float32"]}
        if self.delivered != want:
            raise RuntimeError(f"{self.name} delivered {self.delivered}, expected {want}")
        Contender.start(self, warmup)


class RingfeedPythonOp(RingfeedGenerator):
    """The generator of a service whose workers run the augmentation as per-sample numpy in a
    ``python`` op (``PYTHON_AUGMENT``): the same function as the per-sample DataLoader."""

    def __init__(self, endpoint: str, workers: int):
        super().__init__(endpoint, workers)
        self.name = f"ringfeed-python-op-generator-w{workers}"
        self.label = f"ringfeed generator(), {workers} workers, python op (per-sample numpy)"
