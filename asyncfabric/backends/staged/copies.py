"""GPU copies and their notices: the CUDA side of the staged path (and of cuda_ipc).

Nothing here blocks on CUDA. :class:`CopyWaiter` runs a follow-up on the
event-loop thread once a copy is done: a per-GPU *notify stream* waits for the
copy's event and runs a native host function (cudanote.c) that counts and rings
the transport's notify fd, and the next drain runs the follow-ups in order.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from ..._errors import RegionError, TransferError

FollowUp = Callable[[Exception | None], None]


class CopyFailed(TransferError):
    """A GPU copy of the staged path (or cuda_ipc) failed; the message names the copy."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno.EIO)


class HostEvent:
    """The event of a copy that already happened (the host stand-ins, and injected faults).

    ``error``: the copy failed with it (its follow-up is called with it).
    """

    __slots__ = ("error",)

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def synchronize(self) -> None:
        return None


class _DevNotes:
    """One GPU's notify stream, its reusable event, and the follow-ups queued on it."""

    __slots__ = ("note", "stream", "handle", "event", "fns", "seen")

    def __init__(self, note: Any, stream: Any, event: int) -> None:
        self.note, self.stream, self.event = note, stream, event
        self.handle = int(stream.cuda_stream)
        self.fns: deque[FollowUp] = deque()
        self.seen = 0  # host functions whose follow-up already ran


class CopyWaiter:
    """Runs follow-ups of GPU copies on the event-loop thread, with no helper thread.

    ``when_done(ev, fn, device)`` calls ``fn(None)`` on the event-loop thread once
    the torch event ``ev`` completed (``fn(error)`` for a :class:`HostEvent` that
    carries one); ``after_stream(stream, device, fn)`` once the work queued so far
    on a raw CUDA stream did. Per GPU, a notify stream waits for the event and runs
    a native host function (cudanote.c: count, ring the notify fd), so no thread
    of ours blocks on CUDA and the follow-ups run in the same drain that reaps
    fabric completions (:meth:`run_done`). Host functions on one stream run in
    order, so follow-ups are matched to them by counting. A CUDA error that stops
    the stream leaves its follow-ups pending: their transfers fail by timeout.
    """

    def __init__(self, notify_fd: int) -> None:
        self._fd = notify_fd
        # follow-ups of work that was already complete (the host stand-ins)
        self._ready: deque[tuple[FollowUp, Exception | None]] = deque()
        self._devs: dict[int, _DevNotes] = {}
        self._streams: dict[int, Any] = {}
        self._fn = 0
        self._closed = False

    def stream(self, device_index: int) -> Any:
        """The engine's copy stream on one GPU (created on first use)."""
        s = self._streams.get(device_index)
        if s is None:
            import torch

            s = self._streams[device_index] = torch.cuda.Stream(device=device_index)
        return s

    def _dev(self, device: int) -> _DevNotes:
        d = self._devs.get(device)
        if d is None:
            if self._closed:
                raise TransferError("the engine's GPU copy notices are closed")
            import torch

            from ..libfabric import ffi, lib
            from . import _cuda

            note = ffi.new("af_cuda_note *")
            note.fd = self._fd
            self._fn = int(lib.afc_note_fn())
            with _cuda.on_device(device):
                ev = _cuda.event_create()
            d = self._devs[device] = _DevNotes(note, torch.cuda.Stream(device=device), ev)
        return d

    def when_done(self, ev: Any, fn: FollowUp, device: int | None = None) -> None:
        if self._closed:
            raise TransferError("the engine's GPU copy notices are closed")
        if ev.__class__ is HostEvent:
            self._ready.append((fn, ev.error))
            try:
                os.eventfd_write(self._fd, 1)
            except OSError:
                pass
            return
        from ..libfabric import ffi
        from . import _cuda

        if device is None:
            import torch

            device = torch.cuda.current_device()
        d = self._dev(device)
        d.stream.wait_event(ev)
        with _cuda.on_device(device):
            _cuda.launch_host(d.handle, self._fn, int(ffi.cast("uintptr_t", d.note)))
        d.fns.append(fn)

    def after_stream(self, stream: int, device: int, fn: FollowUp) -> None:
        """``fn`` after the work queued so far on ``stream`` (device's context is current)."""
        from ..libfabric import ffi
        from . import _cuda

        d = self._dev(device)
        _cuda.notify_after(stream, d.event, d.handle, self._fn, int(ffi.cast("uintptr_t", d.note)))
        d.fns.append(fn)

    def pending(self) -> int:
        """Follow-ups ready to run now."""
        if not self._devs:
            return len(self._ready)
        from ..libfabric import lib

        return len(self._ready) + sum(
            int(lib.afc_note_fired(d.note)) - d.seen for d in self._devs.values()
        )

    def run_done(self) -> int:
        """Run the follow-ups of completed copies (event-loop thread); returns how many."""
        n = 0
        ready = self._ready
        while ready:
            fn, err = ready.popleft()
            fn(err)
            n += 1
        if self._devs:
            from ..libfabric import lib

            for d in list(self._devs.values()):
                fired = int(lib.afc_note_fired(d.note))
                while d.seen < fired and d.fns:
                    d.seen += 1
                    d.fns.popleft()(None)
                    n += 1
        return n

    def close(self) -> None:
        """Wait for queued host functions (they write to the notify fd and the notes)."""
        self._closed = True
        self._ready.clear()
        for d in self._devs.values():
            try:
                d.stream.synchronize()
            except Exception:
                pass
            d.note.fd = -1


class StagedMemory:
    """A GPU buffer (or, for tests, a host tensor) and its host *mirror*.

    The mirror is the bounce buffer of both directions: pinned for a GPU tensor,
    so the copy engines reach it directly and the copies are truly asynchronous.

    ``fault`` is a test hook: set it to ``"d2h"`` or ``"h2d"`` and the next such
    copy fails (its event carries a :class:`CopyFailed`, as an asynchronous CUDA
    error would) instead of running.
    """

    def __init__(self, tensor: Any, helper: CopyWaiter) -> None:
        import torch

        self.dev = tensor.reshape(-1).view(torch.uint8)
        self.nbytes = int(self.dev.numel())
        self.on_gpu = self.dev.device.type == "cuda"
        self.device_index = self.dev.device.index if self.on_gpu else -1
        self.host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.on_gpu)
        self.host_ptr = int(self.host.data_ptr())
        self._helper = helper
        self.fault: str | None = None

    def _injected(self, kind: str, what: str) -> HostEvent | None:
        if self.fault != kind:
            return None
        self.fault = None
        return HostEvent(CopyFailed(f"{what} failed: injected by the StagedMemory.fault test hook"))

    def d2h(self, off: int, pieces: list[tuple[int, int]], producer: Any) -> list[Any]:
        """Enqueue device-to-host copies of ``pieces`` (relative to ``off``); one event each.

        On a GPU they run on the engine's copy stream, after the work queued on
        ``producer`` so far (the producer's writes to the tensor come first).
        """
        bad = self._injected("d2h", "the staged device-to-host copy of the write's first piece")
        if bad is not None:
            return [bad] + [HostEvent() for _ in pieces[1:]]
        if not self.on_gpu:
            for o, n in pieces:
                self.host[off + o : off + o + n].copy_(self.dev[off + o : off + o + n])
            return [HostEvent() for _ in pieces]
        import torch

        s = self._helper.stream(self.device_index)
        s.wait_stream(producer)
        evs = []
        with torch.cuda.stream(s):
            for o, n in pieces:
                a = off + o
                self.host[a : a + n].copy_(self.dev[a : a + n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(s)
                evs.append(ev)
        return evs

    def h2d(self, off: int, n: int) -> Any:
        """Enqueue the host-to-device copy of ``[off, off+n)``; returns its event."""
        bad = self._injected("h2d", f"the staged host-to-device copy of {n} bytes at {off}")
        if bad is not None:
            return bad
        if not self.on_gpu:
            self.dev[off : off + n].copy_(self.host[off : off + n])
            return HostEvent()
        import torch

        s = self._helper.stream(self.device_index)
        with torch.cuda.stream(s):
            self.dev[off : off + n].copy_(self.host[off : off + n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        return ev


def producer_stream(device_index: int, stream: Any) -> Any:
    """The stream a CUDA source must be read after: the caller's, else its device's current."""
    if stream is not None:
        return stream
    import torch

    return torch.cuda.current_stream(device_index if device_index >= 0 else None)


def is_tensor(obj: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def check_stageable(owner: Any) -> None:
    if not is_tensor(owner):
        raise RegionError(
            "GPU memory is registered as a torch tensor here (the staged path copies it with "
            "torch); pass the tensor itself"
        )
