"""GPU memory on transports that cannot register it: the staged path (docs/gpu.md).

A staged GPU region owns a pinned host *mirror* of its size, registered with the
transport; its descriptor carries FLAG_STAGED and the mirror's keys.

Sender (GPU source): every piece of the write is copied device-to-host into the
source's mirror on the engine's copy stream, all pieces enqueued at once after
an event on the producer stream; the network write of piece k is posted as soon
as its copy's event completes, so the copy of piece k+1 overlaps the write of
piece k.

Receiver (GPU target): pieces land in the target's mirror *without* the
immediate. Once a piece's write is complete at the sender, a landing notice (a
control message: region, offset, length, imm, count) follows; the receiver
copies that range host-to-device and only when the copy's event has completed
does it add ``count`` to the counter of ``imm``. The counting rule is unchanged
(pieces are whole multiples of the target's chunk_bytes, so the counts add up to
``expected_imms(n)``), and a counter never fires before the data is in GPU memory.

No thread of ours waits on CUDA events: a CUDA host function (cudanote.c) rings
the transport's notify fd when a copy is done, and the follow-up (post the next
write, credit a counter) runs on the event-loop thread in the next drain, so
every transport call stays on the loop thread. Python work is O(pieces), and
pieces are large (PIECE_BYTES).
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from ._errors import RegionError, TransferError
from ._imm import expected_imms

if TYPE_CHECKING:
    from ._descriptor import RemoteSlice
    from ._engine import Engine
    from ._region import RegionSlice

PIECE_BYTES = 4 << 20  # per pipelined piece: long enough to amortize a post, short for overlap
MSG_USER, MSG_LANDED = 0, 1
_LANDED = struct.Struct("<IQQqQ")  # region id, offset, length, imm (-1: none), count


class _HostEvent:
    """The event of a copy that already happened (the host stand-in used by tests)."""

    def synchronize(self) -> None:
        return None


class _DevNotes:
    """One GPU's notify stream, its reusable event, and the follow-ups queued on it."""

    __slots__ = ("note", "stream", "handle", "event", "fns", "seen")

    def __init__(self, note: Any, stream: Any, event: int) -> None:
        self.note, self.stream, self.event = note, stream, event
        self.handle = int(stream.cuda_stream)
        self.fns: deque[Callable[[BaseException | None], None]] = deque()
        self.seen = 0  # host functions whose follow-up already ran


class CopyWaiter:
    """Runs follow-ups of GPU copies on the event-loop thread, with no helper thread.

    ``when_done(ev, fn, device)`` calls ``fn(None)`` on the event-loop thread once
    the torch event ``ev`` completed; ``after_stream(stream, device, fn)`` once the
    work queued so far on a raw CUDA stream did. Per GPU, a *notify stream* waits
    for the event and runs a native host function (cudanote.c: count, ring the
    engine's notify fd), so no thread of ours blocks on CUDA and the follow-ups run
    in the same drain that reaps fabric completions. Host functions on one stream
    run in order, so follow-ups are matched to them by counting. A CUDA error that
    stops the stream leaves its follow-ups pending: their transfers fail by timeout.
    """

    def __init__(self, notify_fd: int) -> None:
        self._fd = notify_fd
        # follow-ups of work that was already complete (the host stand-ins)
        self._ready: deque[tuple[Callable[[BaseException | None], None], Any]] = deque()
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

            from .backends.cuda_ipc import _driver
            from .backends.libfabric import ffi, lib

            note = ffi.new("af_cuda_note *")
            note.fd = self._fd
            self._fn = int(lib.afc_note_fn())
            with _driver.on_device(device):
                ev = _driver.event_create()
            d = self._devs[device] = _DevNotes(note, torch.cuda.Stream(device=device), ev)
        return d

    def when_done(
        self, ev: Any, fn: Callable[[BaseException | None], None], device: int | None = None
    ) -> None:
        if self._closed:
            raise TransferError("the engine's GPU copy notices are closed")
        if isinstance(ev, _HostEvent):
            self._ready.append((fn, None))
            try:
                os.eventfd_write(self._fd, 1)
            except OSError:
                pass
            return
        from .backends.cuda_ipc import _driver
        from .backends.libfabric import ffi

        if device is None:
            import torch

            device = torch.cuda.current_device()
        d = self._dev(device)
        d.stream.wait_event(ev)
        with _driver.on_device(device):
            _driver.launch_host(d.handle, self._fn, int(ffi.cast("uintptr_t", d.note)))
        d.fns.append(fn)

    def after_stream(
        self, stream: int, device: int, fn: Callable[[BaseException | None], None]
    ) -> None:
        """``fn`` after the work queued so far on ``stream`` (device's context is current)."""
        from .backends.cuda_ipc import _driver
        from .backends.libfabric import ffi

        d = self._dev(device)
        _driver.notify_after(
            stream, d.event, d.handle, self._fn, int(ffi.cast("uintptr_t", d.note))
        )
        d.fns.append(fn)

    def pending(self) -> int:
        if not self._devs:
            return len(self._ready)
        from .backends.libfabric import lib

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
            from .backends.libfabric import lib

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
        for d in self._devs.values():
            try:
                d.stream.synchronize()
            except Exception:
                pass
            d.note.fd = -1


class StagedMemory:
    """A GPU buffer and its pinned host mirror (registered with the transport)."""

    def __init__(self, tensor: Any, helper: CopyWaiter | None) -> None:
        import torch

        self.dev = tensor.reshape(-1).view(torch.uint8)
        self.nbytes = int(self.dev.numel())
        self.on_gpu = self.dev.device.type == "cuda"
        self.device_index = self.dev.device.index if self.on_gpu else -1
        # The mirror is the bounce buffer of both directions: pinned, so the copy
        # engines reach it directly and the copies are truly asynchronous.
        self.host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.on_gpu)
        self.host_ptr = int(self.host.data_ptr())
        self._helper = helper

    def _stream(self) -> Any:
        assert self._helper is not None
        return self._helper.stream(self.device_index)

    def d2h(self, off: int, pieces: list[tuple[int, int]], producer: Any) -> list[Any]:
        """Enqueue device-to-host copies of ``pieces`` (relative to ``off``); one event each."""
        if not self.on_gpu:
            for o, n in pieces:
                self.host[off + o : off + o + n].copy_(self.dev[off + o : off + o + n])
            return [_HostEvent() for _ in pieces]
        import torch

        s = self._stream()
        s.wait_stream(producer)  # the producer's writes to the tensor come first
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
        if not self.on_gpu:
            self.dev[off : off + n].copy_(self.host[off : off + n])
            return _HostEvent()
        import torch

        s = self._stream()
        with torch.cuda.stream(s):
            self.dev[off : off + n].copy_(self.host[off : off + n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        return ev


class _Callback:
    """Stands in for a loop waiter in Engine._ops: completion calls ``fn(exc or None)``."""

    __slots__ = ("_fn", "_done")

    def __init__(self, fn: Callable[[BaseException | None], None]) -> None:
        self._fn = fn
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, _value: Any) -> None:
        if not self._done:
            self._done = True
            self._fn(None)

    def set_exception(self, exc: BaseException) -> None:
        if not self._done:
            self._done = True
            self._fn(exc)


def piece_bytes(chunk: int) -> int:
    """Whole chunks per piece, so per-piece counts add up to the transfer's count."""
    return chunk * max(1, PIECE_BYTES // chunk)


def producer_stream(region_device_index: int, stream: Any) -> Any:
    if stream is not None:
        return stream
    import torch

    return torch.cuda.current_stream(region_device_index)


async def staged_write(
    eng: Engine, s: RegionSlice, d: RemoteSlice, imm: int, timeout: float | None, stream: Any
) -> None:
    """A write whose source and/or target is staged GPU memory (see the module docstring)."""
    region = s.region
    desc = d.descriptor
    src_stage: StagedMemory | None = region._stage
    dst_staged = desc.staged
    t = eng._t
    route = eng._route(desc)  # checked by write(); here a cache hit
    n, c = s.nbytes, desc.chunk_bytes
    step = piece_bytes(c)
    pieces = [(o, min(step, n - o)) for o in range(0, n, step)]
    fut = eng._loop.new_waiter()
    state = {"left": len(pieces), "failed": False}
    region._inflight += 1

    def finish(exc: BaseException | None) -> None:
        # Each piece ends exactly once (done, failed, or abandoned after a failure);
        # the source region is released only when the last one has.
        state["left"] -= 1
        if exc is not None and not state["failed"]:
            state["failed"] = True
            if not fut.done():
                fut.set_exception(exc)
        if state["left"] == 0:
            region._inflight -= 1
            if region._closed and region._inflight == 0:
                eng._deregister(region)
            if not fut.done():
                fut.set_result(None)

    def post(k: int, err: BaseException | None) -> None:
        if err is not None or state["failed"] or eng._closed:
            finish(err or TransferError("the staged transfer was abandoned after a failure"))
            return
        o, ln = pieces[k]
        base = src_stage.host_ptr if src_stage is not None else region.ptr
        token = next(eng._tokens)
        eng._ops[token] = (_Callback(partial(written, k)), None)
        try:
            rc = t.post_write(
                token,
                route.peer,
                route.ndom,
                base + s.offset + o,
                region._reg.handle,
                ln,
                c,
                route.remote,
                d.offset + o,
                -1 if dst_staged else imm,
            )
        except BaseException as exc:
            eng._ops.pop(token, None)
            finish(exc)
            return
        if rc == 1:
            eng._ops.pop(token, None)
            written(k, None)

    def written(k: int, err: BaseException | None) -> None:
        if err is not None or not dst_staged:
            finish(err)
            return
        o, ln = pieces[k]
        count = expected_imms(ln, chunk_bytes=c) if imm >= 0 else 0
        msg = bytes([MSG_LANDED]) + _LANDED.pack(desc.region_id, d.offset + o, ln, imm, count)
        token = next(eng._tokens)
        eng._ops[token] = (_Callback(finish), None)
        try:
            rc = t.post_send(token, route.peer, msg)
        except BaseException as exc:
            eng._ops.pop(token, None)
            finish(exc)
            return
        if rc == 1:
            eng._ops.pop(token, None)
            finish(None)

    if src_stage is not None:
        prod = producer_stream(src_stage.device_index, stream) if src_stage.on_gpu else None
        evs = src_stage.d2h(s.offset, pieces, prod)
        helper = eng._gpu_helper()
        for k, ev in enumerate(evs):
            helper.when_done(ev, partial(post, k), src_stage.device_index)
    else:
        for k in range(len(pieces)):
            post(k, None)
    eng._after_call()
    try:
        await eng._loop.wait(fut, timeout)
    except TimeoutError:
        from ._errors import ImmTimeout

        raise ImmTimeout(
            f"staged transfer not complete within {timeout} s; it stays in flight"
        ) from None


def on_landed(eng: Engine, body: bytes) -> None:
    """A landing notice: copy the range to the GPU, then count its immediates."""
    try:
        rid, off, n, imm, count = _LANDED.unpack(body)
    except struct.error:
        eng._staging_errors += 1
        return
    region = eng._regions.get(rid)
    stage = region._stage if region is not None else None
    if stage is None or off + n > stage.nbytes:
        # the region was closed (or never was staged): nothing to copy into
        eng._staging_errors += 1
        return

    def credit(err: BaseException | None) -> None:
        if err is not None:
            eng._staging_errors += 1
            eng._fatal = err
            return
        if count and not eng._closed:
            eng._t.counter_give(imm, count)

    ev = stage.h2d(off, n)
    if isinstance(ev, _HostEvent):
        credit(None)
    else:
        eng._gpu_helper().when_done(ev, credit, stage.device_index)


def check_stageable(info: Any) -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not isinstance(info.owner, torch.Tensor):
        raise RegionError(
            "GPU memory is registered as a torch tensor here (the staged path copies it with "
            "torch); pass the tensor itself"
        )
