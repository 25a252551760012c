"""The CUDA IPC driver calls cuda_ipc needs, through ctypes on libcuda.so.1.

The loader, contexts and the stream/event calls are shared with the staged
path (``asyncfabric.backends.staged._cuda``, re-exported here); this module adds
what only cuda_ipc does: find an allocation, export it, map a peer's.
"""

from __future__ import annotations

import ctypes
from typing import Any

from ..staged._cuda import (
    WAIT_VALUE_EQ,
    check,
    copy_async,
    event_create,
    host_words,
    launch_host,
    notify_after,
    on_device,
    stream_sync,
    use_device,
    wait_value32,
    write_value32,
)
from ..staged._cuda import lib as _base_lib

__all__ = [
    "WAIT_VALUE_EQ",
    "allocation_of",
    "check",
    "copy_async",
    "event_create",
    "host_words",
    "ipc_close",
    "ipc_handle",
    "ipc_open",
    "launch_host",
    "lib",
    "notify_after",
    "on_device",
    "stream_sync",
    "use_device",
    "wait_value32",
    "write_value32",
]

IPC_LAZY_ENABLE_PEER_ACCESS = 1
HANDLE_BYTES = 64


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * HANDLE_BYTES)]


_ipc_ready = False


def lib() -> Any:
    """libcuda.so.1 with the IPC calls' argument types set as well."""
    global _ipc_ready
    dll = _base_lib()
    if not _ipc_ready:
        u64, sz = ctypes.c_uint64, ctypes.c_size_t
        dll.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(u64), ctypes.POINTER(sz), u64]
        dll.cuIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), u64]
        dll.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(u64), _IpcHandle, ctypes.c_uint]
        dll.cuIpcCloseMemHandle.argtypes = [u64]
        _ipc_ready = True
    return dll


def allocation_of(ptr: int) -> tuple[int, int]:
    """(base, size) of the cudaMalloc allocation holding ``ptr``."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    check(
        lib().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ptr),
        "cuMemGetAddressRange",
    )
    return int(base.value), int(size.value)


def ipc_handle(base: int) -> bytes:
    h = _IpcHandle()
    check(lib().cuIpcGetMemHandle(ctypes.byref(h), base), "cuIpcGetMemHandle")
    return bytes(ctypes.string_at(ctypes.addressof(h), HANDLE_BYTES))


def ipc_open(handle: bytes) -> int:
    if len(handle) != HANDLE_BYTES:
        raise ValueError(f"a CUDA IPC handle is {HANDLE_BYTES} bytes, got {len(handle)}")
    h = _IpcHandle.from_buffer_copy(handle)
    p = ctypes.c_uint64()
    check(
        lib().cuIpcOpenMemHandle_v2(ctypes.byref(p), h, IPC_LAZY_ENABLE_PEER_ACCESS),
        "cuIpcOpenMemHandle (is the peer on this host, and its GPU reachable by peer access?)",
    )
    return int(p.value)


def ipc_close(ptr: int) -> None:
    lib().cuIpcCloseMemHandle(ptr)
