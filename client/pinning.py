"""Page-locking a mapped ring for copies to a CUDA device: ``Feed(pin_memory=True)``.

A batch the trainer hands to a GPU framework is copied from host to device.
From pageable memory the driver stages it through a bounce buffer; from
page-locked memory the copy engine reads the slot itself. PyTorch's
DataLoader gets there by copying every batch into pinned memory on a thread;
here the client registers its whole mapping of the ring once, with
``cudaHostRegister``, so no batch is copied on the host at all.

The registration lasts as long as the mapping: a finalizer on the mapping
undoes it, and holds the mmap open until it has, so CUDA never sees pinned
pages unmapped under it.
"""

from __future__ import annotations

import logging
import weakref

from .errors import PinMemoryError

log = logging.getLogger("ringfeed.client")
_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context, not only the current one


def cuda_runtime():
    """PyTorch's binding of the CUDA runtime; ``PinMemoryError`` without torch or a device."""
    try:
        import torch
    except ImportError as exc:
        raise PinMemoryError(f"pin_memory=True needs PyTorch with CUDA to page-lock the ring, "
                             f"and torch is not importable ({exc})") from exc
    if not torch.cuda.is_available():
        raise PinMemoryError("pin_memory=True needs a CUDA device, and torch.cuda.is_available() is False")
    return torch.cuda.cudart()


def pin(cudart, mapping) -> None:
    """Register ``mapping`` (a ``RingMapping``) with CUDA until it is collected."""
    error = int(cudart.cudaHostRegister(mapping.address, mapping.nbytes, _PORTABLE))
    if error:
        raise PinMemoryError(f"cudaHostRegister of the ring mapping ({mapping.nbytes:,} bytes at "
                             f"{mapping.address:#x}) failed with CUDA error {error}")
    weakref.finalize(mapping, _unpin, cudart, mapping.address, mapping.mmap)


def _unpin(cudart, address: int, mmap_) -> None:
    """``mmap_`` is unused: the finalizer's reference to it keeps the mapping until this returns."""
    error = int(cudart.cudaHostUnregister(address))
    if error:
        log.warning("cudaHostUnregister of the ring mapping at %#x failed with CUDA error %d", address, error)
