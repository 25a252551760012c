"""The CUDA driver calls asyncfabric makes itself, through ctypes on libcuda.so.1.

The driver library ships with every NVIDIA driver, so nothing is built. torch
owns the CUDA runtime in the process; it uses each device's primary context,
which is the one these calls make current, so pointers and streams are shared.
This module holds the loader and the calls the copy notices need
(:mod:`.copies`); the cuda_ipc backend adds its IPC calls in its ``_driver``.
"""

from __future__ import annotations

import ctypes
from typing import Any

from ..._errors import TransferError

EVENT_DISABLE_TIMING = 2

_lib: Any = None
_ctx: dict[int, ctypes.c_void_p] = {}


def lib() -> Any:
    """libcuda.so.1, loaded once, with the argument types of the calls made here."""
    global _lib
    if _lib is None:
        try:
            dll = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise TransferError(
                f"cannot load the CUDA driver (libcuda.so.1: {exc}); GPU memory needs an NVIDIA "
                "GPU and its driver"
            ) from None
        u64, sz, vp = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p
        dll.cuMemcpyAsync.argtypes = [u64, u64, sz, vp]
        dll.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(vp), ctypes.c_int]
        dll.cuCtxSetCurrent.argtypes = [vp]
        dll.cuCtxGetCurrent.argtypes = [ctypes.POINTER(vp)]
        dll.cuEventCreate.argtypes = [ctypes.POINTER(vp), ctypes.c_uint]
        dll.cuEventRecord.argtypes = [vp, vp]
        dll.cuStreamWaitEvent.argtypes = [vp, vp, ctypes.c_uint]
        dll.cuLaunchHostFunc.argtypes = [vp, vp, vp]
        dll.cuStreamSynchronize.argtypes = [vp]
        dll.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        _lib = dll
    return _lib


def check(rc: int, what: str) -> None:
    if rc:
        s = ctypes.c_char_p()
        lib().cuGetErrorString(rc, ctypes.byref(s))
        text = s.value.decode() if s.value else "unknown"
        raise TransferError(f"{what} failed: CUDA error {rc} ({text})", rc)


def use_device(device: int) -> None:
    """Make ``device``'s primary context current on this thread (as torch does)."""
    ctx = _ctx.get(device)
    if ctx is None:
        ctx = ctypes.c_void_p()
        check(lib().cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device), "cuDevicePrimaryCtxRetain")
        _ctx[device] = ctx
    check(lib().cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


class on_device:
    """``with on_device(d):`` device ``d``'s context is current inside, the caller's after."""

    def __init__(self, device: int) -> None:
        self.device = device
        self.saved = ctypes.c_void_p()

    def __enter__(self) -> None:
        check(lib().cuCtxGetCurrent(ctypes.byref(self.saved)), "cuCtxGetCurrent")
        use_device(self.device)

    def __exit__(self, *exc: object) -> None:
        lib().cuCtxSetCurrent(self.saved)


def copy_async(dst: int, src: int, n: int, stream: int) -> None:
    check(lib().cuMemcpyAsync(dst, src, n, stream), f"cuMemcpyAsync of {n} bytes")


def event_create() -> int:
    """A CUDA event without timing, in the current context (reused, never freed)."""
    ev = ctypes.c_void_p()
    check(lib().cuEventCreate(ctypes.byref(ev), EVENT_DISABLE_TIMING), "cuEventCreate")
    return int(ev.value or 0)


def notify_after(copy_stream: int, event: int, notify_stream: int, fn: int, arg: int) -> None:
    """Run host function ``fn(arg)`` once the work queued on ``copy_stream`` so far is done.

    The copy stream only records ``event``; the notify stream waits on it and runs
    the host function, so the copy stream never stalls on the host. The event can
    be recorded again at once: a wait captures the event's state when enqueued.
    """
    d = lib()
    check(d.cuEventRecord(event, copy_stream), "cuEventRecord")
    check(d.cuStreamWaitEvent(notify_stream, event, 0), "cuStreamWaitEvent")
    check(d.cuLaunchHostFunc(notify_stream, fn, arg), "cuLaunchHostFunc")


MEMHOSTALLOC_PORTABLE = 0x01
MEMHOSTALLOC_DEVICEMAP = 0x02
WAIT_VALUE_GEQ = 0x0
WAIT_VALUE_EQ = 0x1
WAIT_VALUE_FLUSH = 1 << 30
WRITE_VALUE_DEFAULT = 0x0  # a memory fence before the write: earlier work is visible first

_entries: dict[str, Any] = {}


def entry(name: str) -> Any:
    """The driver entry point ``name`` (its ``_v2`` where the driver has one), with
    its argument types, looked up once."""
    fn = _entries.get(name)
    if fn is None:
        d = lib()
        u64, u32, vp = ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p
        for sym in (name + "_v2", name):
            fn = getattr(d, sym, None)
            if fn is not None:
                break
        if fn is None:
            raise TransferError(
                f"this CUDA driver has no {name}; stream memory operations need CUDA 11.7 or "
                "newer (update the NVIDIA driver)"
            )
        if name in ("cuStreamWriteValue32", "cuStreamWaitValue32"):
            fn.argtypes = [vp, u64, u32, ctypes.c_uint]
        elif name == "cuMemHostAlloc":
            fn.argtypes = [ctypes.POINTER(vp), ctypes.c_size_t, ctypes.c_uint]
        elif name == "cuMemHostGetDevicePointer":
            fn.argtypes = [ctypes.POINTER(u64), vp, ctypes.c_uint]
        elif name == "cuMemFreeHost":
            fn.argtypes = [vp]
        _entries[name] = fn
    return fn


def write_value32(stream: int, dev_ptr: int, value: int) -> None:
    """``cuStreamWriteValue32`` with the default flags (a memory fence first: the work
    queued before it is visible before the word is). The _v2 entry point refuses
    ``NO_MEMORY_BARRIER`` (an H100 run said "invalid argument"), so every store fences."""
    check(
        entry("cuStreamWriteValue32")(stream, dev_ptr, value, WRITE_VALUE_DEFAULT),
        "cuStreamWriteValue32",
    )


def wait_value32(stream: int, dev_ptr: int, value: int, flags: int = WAIT_VALUE_GEQ) -> None:
    """``cuStreamWaitValue32``: the stream waits until the word reaches ``value``."""
    check(entry("cuStreamWaitValue32")(stream, dev_ptr, value, flags), "cuStreamWaitValue32")


def host_words(nbytes: int) -> tuple[int, int]:
    """Pinned host memory mapped into the current device (``cuMemHostAlloc`` with
    PORTABLE | DEVICEMAP), zeroed: (host pointer, device pointer). Free it with
    :func:`free_host`, once no stream can touch it any more."""
    p = ctypes.c_void_p()
    flags = MEMHOSTALLOC_PORTABLE | MEMHOSTALLOC_DEVICEMAP
    check(entry("cuMemHostAlloc")(ctypes.byref(p), nbytes, flags), "cuMemHostAlloc")
    ctypes.memset(p, 0, nbytes)
    dptr = ctypes.c_uint64()
    check(entry("cuMemHostGetDevicePointer")(ctypes.byref(dptr), p, 0), "cuMemHostGetDevicePointer")
    return int(p.value or 0), int(dptr.value)


def free_host(host: int) -> None:
    entry("cuMemFreeHost")(ctypes.c_void_p(host))


def launch_host(stream: int, fn: int, arg: int) -> None:
    check(lib().cuLaunchHostFunc(stream, fn, arg), "cuLaunchHostFunc")


def stream_sync(stream: int) -> None:
    check(lib().cuStreamSynchronize(stream), "cuStreamSynchronize")
