"""CUDA stream memory operations on asyncfabric flags: a stream fires triggers and
waits on counters' release words, with no host in the loop (docs/gpu.md, "Triggers").

* :func:`cuda_flag` makes a :class:`~asyncfabric.Flag` in pinned host memory mapped into
  the GPU's address space (``cuMemHostAlloc`` with ``DEVICEMAP``); its ``device_ptr`` is
  the word as the GPU addresses it.
* :func:`stream_fire` enqueues ``cuStreamWriteValue32(flag, value)`` on a stream: when
  the stream reaches it (after the work queued before it, with a memory fence), the
  engine's watcher sees the word and posts what was armed on it (``Engine.arm``).
* :func:`stream_wait` enqueues ``cuStreamWaitValue32(flag, value, GEQ)``: the stream
  stalls until the word reaches ``value``, which a release word stores once a counter
  has counted its arrivals (``ImmCounter.release_word``).

* Signal words: on cuda_ipc a stream can also store into a word of a *peer's* GPU
  memory (``Engine.peer_word`` maps it) while the peer's stream waits on it in its
  own memory (``stream_wait`` on a CUDA tensor): GPU to GPU with no host at all.

All are stream memory operations, so they are captured into CUDA graphs like any
other stream work. The calls go through ctypes on ``libcuda.so.1`` (the driver, present
wherever a GPU is); nothing is built. torch owns the CUDA runtime: streams are torch
streams (default: the current stream), contexts are the devices' primary contexts.
Importing this module needs no GPU; the calls raise :class:`TransferError` without one.
"""

from __future__ import annotations

from typing import Any

from ._buffers import buffer_info
from ._errors import TransferError
from ._flag import DeviceWord, Flag, check_u32
from .backends.staged import _cuda
from .engine.trigger import Trigger

WAIT_VALUE_GEQ = _cuda.WAIT_VALUE_GEQ
WAIT_VALUE_FLUSH = _cuda.WAIT_VALUE_FLUSH


def _current_device() -> int:
    try:
        import torch
    except ImportError:
        raise TransferError("CUDA flags need torch with CUDA (pip install torch)") from None
    if not torch.cuda.is_available():
        raise TransferError(
            "CUDA flags need a CUDA device, and torch sees none here; on a CPU-only machine "
            "use af.Flag() and write the word from the host"
        )
    return int(torch.cuda.current_device())


class _PinnedWord:
    """Owns the pinned allocation behind a CUDA flag; frees it when the flag goes."""

    __slots__ = ("ptr", "device")

    def __init__(self, ptr: int, device: int) -> None:
        self.ptr, self.device = ptr, device

    def __del__(self) -> None:
        try:
            _cuda.free_host(self.ptr)
        except Exception:  # interpreter shutdown: the process frees it anyway
            pass


def cuda_flag(device: int | None = None) -> Flag:
    """A :class:`Flag` whose word a CUDA stream can write and wait on: 64 bytes of
    pinned host memory mapped into ``device``'s address space (default: torch's
    current device), zeroed. Arm triggers and release words on it like any flag."""
    dev = _current_device() if device is None else int(device)
    _cuda.use_device(dev)  # the primary context torch uses
    host, dptr = _cuda.host_words(64)
    owner = _PinnedWord(host, dev)
    return Flag.from_address(owner.ptr, owner=owner, device_ptr=dptr)


def _stream(stream: Any) -> int:
    """A raw CUDA stream handle: from a torch stream, an int, or None (the current one)."""
    if stream is None:
        import torch

        return int(torch.cuda.current_stream().cuda_stream)
    if isinstance(stream, int):
        return stream
    handle = getattr(stream, "cuda_stream", None)
    if handle is None:
        raise TypeError(
            f"stream must be a torch.cuda.Stream, a raw CUDA stream handle (int) or None, got "
            f"{type(stream).__name__}"
        )
    return int(handle)


Word = Any  # (a Flag, a DeviceWord or a CUDA tensor; checked by _device_ptr)
"""What the stream calls write and wait on: a :class:`Flag` made by :func:`cuda_flag`, a
:class:`DeviceWord` (``Engine.peer_word``), or a CUDA tensor whose first 4 bytes are the
word (an int32/uint32 element of GPU memory: a signal word of one's own)."""


def _device_ptr(flag: Word) -> int:
    if isinstance(flag, (Flag, DeviceWord)):
        if not flag.device_ptr:
            raise TransferError(
                "this flag is plain host memory, which a CUDA stream cannot address; make it "
                "with asyncfabric.cuda_memops.cuda_flag()"
            )
        return flag.device_ptr
    try:
        info = buffer_info(flag)  # a tensor: its device, pointer and size, as register sees them
    except TypeError:  # (a non-contiguous or empty tensor raises its own RegionError)
        info = None
    if info is None or info.device != "cuda":
        raise TypeError(
            "expected an asyncfabric Flag (cuda_memops.cuda_flag()), a DeviceWord "
            f"(Engine.peer_word) or a CUDA tensor of at least 4 bytes, got {type(flag).__name__}"
            + (" in host memory" if info is not None else "")
        )
    if info.nbytes < 4 or info.ptr % 4:
        raise ValueError(
            f"a tensor used as a word needs 4 aligned bytes; this one has {info.nbytes} at "
            f"{info.ptr:#x}"
        )
    return info.ptr


def stream_fire(flag: Word | Trigger, value: int | None = None, stream: Any = None) -> None:
    """Enqueue ``cuStreamWriteValue32(flag, value)`` on ``stream`` (default: torch's
    current stream): once the stream reaches it, after the work queued before it and
    a memory fence, the word holds ``value`` and what is armed on it fires. Also
    resets a word (``stream_fire(flag, 0)``). Captured into CUDA graphs. ``flag`` may
    also be a :class:`DeviceWord` (a peer's signal word, ``Engine.peer_word``) or a
    CUDA tensor (a word of GPU memory): the store is the same.

    Given a :class:`~asyncfabric.Trigger` instead of a flag, fires that trigger: its
    stream work first (on cuda_ipc, the copies of its GPU entries, then the write of
    the private word its immediates are armed on, so the data is in the peer's GPU
    memory before they are posted), then its flag with its value (``value`` defaults
    to the trigger's). A cuda_ipc trigger with GPU entries fires only this way."""
    trig, word = (flag, flag.flag) if isinstance(flag, Trigger) else (None, flag)
    if value is None:
        if trig is None:
            raise TypeError("stream_fire(flag, value): a flag needs the value to write")
        value = trig.value
    ptr, v = _device_ptr(word), check_u32(value, "value")
    s = _stream(stream)
    if trig is not None and trig.stream_work is not None:
        trig.stream_work(s, v)  # the copies, then the fire of what is armed
    _cuda.write_value32(s, ptr, v)


def stream_wait(flag: Word, value: int, stream: Any = None, *, flush: bool = False) -> None:
    """Enqueue ``cuStreamWaitValue32(flag, value, GEQ)`` on ``stream`` (default: torch's
    current stream): work queued after it starts once the word reaches ``value``
    (cyclic >=). ``flag``: a flag, or a word of GPU memory (a CUDA tensor: a signal
    word that peers' streams write). ``flush``: also flush remote writes (data written
    into GPU memory by a NIC, GPUDirect; the device must support it). Captured into
    CUDA graphs."""
    ptr, v = _device_ptr(flag), check_u32(value, "value")
    s = _stream(stream)
    _cuda.wait_value32(s, ptr, v, WAIT_VALUE_GEQ | (WAIT_VALUE_FLUSH if flush else 0))
