"""Streaming (non-temporal) stores, for a kernel's write of a batch into a ring slot.

Nothing reads a slot until the client takes it, batches later, and by then it
has left the cache. A plain store to a line that is not cached first reads the
line from memory (write-allocate), so every batch would cross the memory bus
twice; a streaming store writes the line without reading it. An in-process
loop that reuses one output buffer keeps it in cache with plain stores and
gained nothing measurable from streaming ones, so
streaming is the caller's choice (``Pipeline.run(streaming=True)``).

A kernel streams a row with ``stream_vector`` over ``range(0, span, VECTOR)``,
``span`` from ``stream_span`` (vector streaming stores must be 32-byte
aligned), and plain stores for the rest; then ``store_fence`` orders the
streaming stores, which are weakly ordered, before whatever the thread does
next (on x86-64 only ``sfence`` does: not the locked instruction of a plain
fence). In plain Python ``stream_span`` is 0, so the JIT switch still gives a
kernel free of compiled code.
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

VECTOR = 8  # float32 lanes per 32-byte store
VECTOR_BYTES = 32


def rows_aligned(rows: np.ndarray) -> bool:
    """Whether every row of ``rows`` (C-contiguous float32, rows on the last axis) starts on a
    32-byte boundary, so ``stream_span`` streams all of it; callers pick the streaming kernel
    only then, as its fallback for other rows is slow (plain stores through the row buffer,
    several times the plain kernel's time)."""
    return rows.ctypes.data % VECTOR_BYTES == 0 and rows.shape[-1] % VECTOR == 0


def stream_span(rows):
    """How many floats at the start of each row of ``rows`` (C-contiguous float32, rows on the
    last axis) may go out through ``stream_vector``: all of them if every row starts on a
    32-byte boundary, else none (a misaligned vector streaming store faults). 0 in plain
    Python, where ``stream_vector`` (an intrinsic) cannot run."""
    return 0


def store_fence():
    """Make this thread's streaming stores visible before what follows (none in plain Python)."""


def _float32_c(array, ndim=None) -> bool:
    return (isinstance(array, types.Array) and array.dtype == types.float32 and array.layout == "C"
            and ndim in (None, array.ndim))


@intrinsic
def _address(typingctx, array):
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, ir.IntType(64))
    return types.int64(array), codegen


@intrinsic
def stream_vector(typingctx, dst, start, src):
    """dst[start:start + 8] = src[start:start + 8] (1-D C-contiguous float32 arrays) with one
    streaming store, unchecked: dst there must be 32-byte aligned and ``start + 8`` within
    both, which a loop over ``range(0, stream_span(rows), VECTOR)`` guarantees. Kernels write
    that loop themselves: behind a function call (an overload, inlined or not) it streamed
    5-8% slower in a one-off timing of the kernel here."""
    if not (_float32_c(dst, 1) and _float32_c(src, 1) and isinstance(start, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        dst_data = context.make_array(signature.args[0])(context, builder, args[0]).data
        src_data = context.make_array(signature.args[2])(context, builder, args[2]).data
        vector = ir.VectorType(ir.FloatType(), VECTOR).as_pointer()
        value = builder.load(builder.bitcast(builder.gep(src_data, [args[1]]), vector), align=4)
        store = builder.store(value, builder.bitcast(builder.gep(dst_data, [args[1]]), vector),
                              align=VECTOR_BYTES)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return types.void(dst, start, src), codegen


@intrinsic
def _fence(typingctx):
    def codegen(context, builder, signature, args):
        if platform.machine().lower() in ("x86_64", "amd64"):
            sfence = builder.module.declare_intrinsic("llvm.x86.sse.sfence", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(sfence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


@overload(stream_span, inline="always")
def _stream_span_compiled(rows):
    if not _float32_c(rows):
        return None

    def impl(rows):
        run = rows.shape[-1]
        return run if _address(rows) % VECTOR_BYTES == 0 and run % VECTOR == 0 else 0
    return impl


@overload(store_fence, inline="always")
def _store_fence_compiled():
    def impl():
        _fence()
    return impl
