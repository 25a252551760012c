"""Flag: a 32-bit word in host memory that triggers watch and release words store into.

Shared by the engine (``Engine.arm``, ``ImmCounter.release_word``) and the CUDA glue
(:mod:`asyncfabric.cuda_memops`, which makes flags in pinned memory mapped into a GPU's
address space, so a CUDA stream can write and wait on them). The engine never touches
CUDA: a flag is an address, a 4-byte view of it, and whatever keeps the memory alive.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ._buffers import buffer_info
from ._errors import RegionError

U32_MAX = 0xFFFFFFFF


def check_u32(v: Any, what: str) -> int:
    """``v`` as a 32-bit unsigned value, or a clear error."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{what} must be an int from 0 to 2**32-1, got {type(v).__name__}")
    if not 0 <= int(v) <= U32_MAX:
        raise ValueError(f"{what} {int(v)} is outside 0..2**32-1 (a flag word holds 32 bits)")
    return int(v)


def reached(word: int, value: int) -> bool:
    """Whether a word holding ``word`` has reached ``value``: the cyclic >= that the
    watcher and ``cuStreamWaitValue32`` (GEQ) apply, ``(int32)(word - value) >= 0``."""
    return (word - value) & U32_MAX < 1 << 31


def check_reset(value: int, reset: int, repeat: bool) -> None:
    """A repeating trigger's reset must leave its word unfired, or it fires again at once."""
    if repeat and reset >= 0 and reached(reset, value):
        raise ValueError(
            f"reset {reset} has already reached value {value} (cyclic >=): the trigger would "
            "fire again at once; reset to a value below it (0 for value 1)"
        )


class Flag:
    """A 32-bit word in host memory: what a trigger watches, what a release word sets.

    ``Flag()`` allocates a word of its own (64 bytes, so it shares no cache line);
    ``Flag(buf, offset=k)`` uses 4 bytes of a writable host buffer (numpy array,
    bytearray, CPU torch tensor) at byte ``k`` (a multiple of 4). On a CUDA machine
    ``asyncfabric.cuda_memops.cuda_flag()`` makes one in pinned, GPU-mapped memory;
    its ``device_ptr`` is the address a CUDA stream uses (None for plain host flags).

    The flag keeps its memory alive; anything armed on it keeps the flag alive.
    ``value`` reads the word, ``set(v)`` stores into it (a plain 32-bit store, as a
    GPU's ``cuStreamWriteValue32`` would).
    """

    __slots__ = ("ptr", "device_ptr", "_owner", "_view", "__weakref__")

    def __init__(self, buf: Any = None, *, offset: int = 0) -> None:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset % 4:
            raise ValueError(f"offset must be an int >= 0 and a multiple of 4, got {offset!r}")
        if buf is None:
            arr = np.zeros(16, np.uint32)
            self._init(int(arr.ctypes.data), arr, None)
            return
        info = buffer_info(buf)
        if info.device != "cpu":
            raise RegionError(
                f"a Flag lives in host memory, got {info.device} memory; for a flag a CUDA "
                "stream writes or waits on use asyncfabric.cuda_memops.cuda_flag()"
            )
        if info.readonly:
            raise RegionError("the buffer is read-only; a Flag's word is written to")
        if info.nbytes < offset + 4:
            raise RegionError(
                f"a Flag needs 4 bytes at offset {offset}, but the buffer has {info.nbytes} bytes"
            )
        ptr = info.ptr + offset
        if ptr % 4:
            raise RegionError(f"the flag word at address {ptr:#x} is not 4-byte aligned")
        self._init(ptr, info.owner, None)

    def _init(self, ptr: int, owner: Any, device_ptr: int | None) -> None:
        self.ptr = ptr
        self.device_ptr = device_ptr
        self._owner = owner
        self._view = np.ctypeslib.as_array((ctypes.c_uint32 * 1).from_address(ptr))

    @classmethod
    def from_address(cls, ptr: int, *, owner: Any, device_ptr: int | None = None) -> Flag:
        """A flag at host address ``ptr`` (4-byte aligned) whose memory ``owner`` keeps
        alive; ``device_ptr``: the same word as a GPU addresses it."""
        if not isinstance(ptr, int) or ptr <= 0 or ptr % 4:
            raise RegionError(f"a flag's address must be a 4-byte aligned pointer, got {ptr!r}")
        f = cls.__new__(cls)
        f._init(ptr, owner, device_ptr)
        return f

    @property
    def value(self) -> int:
        """The word now."""
        return int(self._view[0])

    def set(self, value: int) -> None:
        """Store ``value`` (0 to 2**32-1) into the word."""
        self._view[0] = check_u32(value, "a flag value")

    @property
    def word(self) -> np.ndarray:
        """A one-element ``uint32`` numpy view of the word."""
        return self._view

    def __repr__(self) -> str:
        dev = f" device_ptr={self.device_ptr:#x}" if self.device_ptr else ""
        return f"<Flag at {self.ptr:#x} value={self.value}{dev}>"


class DeviceWord:
    """A 32-bit word in GPU memory as a CUDA stream addresses it: no host view.

    What ``Engine.peer_word`` returns (a word of a peer's GPU region, mapped into this
    process on cuda_ipc) and what :func:`asyncfabric.cuda_memops.stream_fire` /
    ``stream_wait`` take besides flags and one-element CUDA tensors. A stream writes
    the word with a fence first, so a peer's stream waiting on it sees the data
    copied before. ``keep`` holds what keeps the mapping alive (the descriptor).
    """

    __slots__ = ("device_ptr", "_keep")

    def __init__(self, device_ptr: int, *, keep: Any = None) -> None:
        if isinstance(device_ptr, bool) or not isinstance(device_ptr, int) or device_ptr <= 0:
            raise TypeError(f"device_ptr must be a positive int, got {device_ptr!r}")
        if device_ptr % 4:
            raise RegionError(f"the device word at {device_ptr:#x} is not 4-byte aligned")
        self.device_ptr = device_ptr
        self._keep = keep

    def __repr__(self) -> str:
        return f"<DeviceWord device_ptr={self.device_ptr:#x}>"
