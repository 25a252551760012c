"""StagedTransport: CUDA memory on a transport that cannot register it, as a wrapper.

See the package docstring (and docs/gpu.md) for the protocol. Layout here:
:class:`StagedWrapper` (the entry point) wraps every transport that is not
CUDA-native in a :class:`StagedTransport`, which

* frames every control message (one byte: a user message or a landing notice)
  and strips the frame on the way in, so the engine sends and receives user
  bytes verbatim;
* registers CUDA tensors directly when the provider can (FI_HMEM, ``cuda``
  "auto"/"direct"), else gives them a host mirror (:class:`StagedRegistration`);
* runs the staged protocol of a write (:class:`_StagedWrite`) and the landing
  notices of the receiver, posting on the inner transport with internal tokens
  (at and above ``2**62``) whose completions it keeps to itself.

Until a CUDA (or staged) registration or a staged remote region first appears,
the hot methods are the inner transport's own bound methods, set as instance
attributes: an engine that never touches GPU memory pays nothing on them.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

from ..._errors import DescriptorError, RegionError, TransferError, Unsupported
from ...transport import (
    EVENTS_READY,
    NO_IMM,
    EventQueue,
    ForwardingTransport,
    Message,
    NativeOps,
    OpDone,
    PagedWrite,
    Registration,
    Remote,
    Target,
    Transport,
    Wrapper,
    WriteBatch,
    expected_imms,
    piece_bytes,
)
from ...transport.batching import SUB_BIT, post_batch_each
from ...transport.events import Event
from ...transport.status import IO_ERROR
from .copies import (
    CopyFailed,
    CopyWaiter,
    HostEvent,
    StagedMemory,
    check_stageable,
    is_tensor,
    producer_stream,
)

PIECE_BYTES = int(os.environ.get("ASYNCFABRIC_STAGED_PIECE_BYTES", 4 << 20))
"""Bytes per pipelined piece (rounded down to whole target chunks): long enough to
amortize a post, short enough for the copy of one piece to overlap the write of
the one before. ``ASYNCFABRIC_STAGED_PIECE_BYTES`` sets it for a process (the GPU
benchmarks sweep it)."""

MSG_USER, MSG_LANDED = 0, 1
_USER = bytes([MSG_USER])
_LANDED_TAG = bytes([MSG_LANDED])
_LANDED = struct.Struct("<QQQqQ")  # stage id, offset, length, imm (-1: none), count
LANDING_NOTICE_BYTES = 1 + _LANDED.size
_STAGE_ID = struct.Struct("<Q")  # leads a staged registration's ext: the receiver's stage id
_INTERNAL = 1 << 62  # tokens of the posts this wrapper makes itself (below SUB_BIT)
_DRAIN_ROUNDS = 8  # inner drains per drain, at most, while our follow-ups cause events
# Methods bound to the inner transport's until staging is first needed.
_HOT = (
    "post_write",
    "post_paged",
    "post_batch",
    "post_read",
    "pending_events",
    "spin",
    "counter_take_spin",
)


@dataclass(frozen=True, slots=True)
class StagedRegistration(Registration):
    """A staged region: ``keys``/``bases`` are its host mirror's; ``ext`` starts with
    the stage id that landing notices name (then the inner registration's ext)."""

    stage: Any = None  # StagedMemory
    mirror: Any = None  # the inner transport's Registration of the mirror
    sid: int = 0


class StagedRemote(Remote):
    """A peer's staged region: writes land in its mirror, then a landing notice follows."""

    __slots__ = ("inner", "sid")

    def __init__(self, peer: int, ndom: int, target: Target, inner: Remote, sid: int) -> None:
        super().__init__(peer, ndom, target)
        self.inner = inner
        self.sid = sid


def _status(exc: Exception) -> int:
    en = getattr(exc, "errno", 0)
    return -en if isinstance(exc, TransferError) and 0 < en < 4096 else IO_ERROR


class _StagedWrite:
    """One write whose source or target (or both) is staged, cut into pieces.

    Each piece ends exactly once (written and noticed, failed, or abandoned after
    a failure). The first failure fails the write at once (``OpDone(held=True)``
    while pieces remain, so the source stays registered); the last piece to end
    sends the final ``OpDone``.
    """

    __slots__ = (
        "t",
        "token",
        "dst",
        "roff",
        "src",
        "soff",
        "pieces",
        "imm",
        "wire_imm",
        "sid",
        "chunk",
        "left",
        "error",
        "status",
    )

    def __init__(
        self,
        t: StagedTransport,
        token: int,
        dst: Remote,
        roff: int,
        src: Registration,
        soff: int,
        pieces: list[tuple[int, int]],
        imm: int,
    ) -> None:
        self.t, self.token, self.roff, self.src, self.soff = t, token, roff, src, soff
        self.pieces, self.imm, self.chunk = pieces, imm, dst.chunk
        if dst.__class__ is StagedRemote:
            self.dst, self.sid, self.wire_imm = dst.inner, dst.sid, NO_IMM  # type: ignore[attr-defined]
        else:
            self.dst, self.sid, self.wire_imm = dst, -1, imm
        self.left = len(pieces)
        self.error: Exception | None = None
        self.status = 0

    def post_all(self, err: Exception | None = None) -> None:
        for k in range(len(self.pieces)):
            self.post(k, err)

    def post(self, k: int, err: Exception | None = None) -> None:
        """Post piece ``k``'s network write (its copy to the mirror, if any, is done)."""
        t = self.t
        if err is None and self.error is None and t._closed:
            err = TransferError("the engine closed during a staged transfer")
        if err is not None or self.error is not None:
            self.end(err)
            return
        o, ln = self.pieces[k]
        tok = t._internal(partial(self.written, k))
        try:
            done = t.inner.post_write(
                tok, self.dst, self.roff + o, self.src, self.soff + o, ln, self.wire_imm, None
            )
        except Exception as exc:
            t._ops.pop(tok, None)
            self.end(exc)
            return
        if done:
            t._ops.pop(tok, None)
            self.written(k, 0, False)

    def written(self, k: int, status: int, held: bool) -> None:
        """Piece ``k``'s write ended: send its landing notice (staged target)."""
        t = self.t
        if status:
            self.fail(
                status, t.inner.error(status, f"staged write of {self.pieces[k][1]} bytes"), held
            )
            if not held:
                self.end(None)
            return
        if self.sid < 0 or self.error is not None:
            self.end(None)
            return
        o, ln = self.pieces[k]
        count = expected_imms(ln, chunk_bytes=self.chunk) if self.imm != NO_IMM else 0
        msg = _LANDED_TAG + _LANDED.pack(self.sid, self.roff + o, ln, self.imm, count)
        tok = t._internal(self.noticed)
        try:
            done = t.inner.post_send(tok, self.dst.peer, msg)
        except Exception as exc:
            t._ops.pop(tok, None)
            self.end(exc)
            return
        if done:
            t._ops.pop(tok, None)
            self.end(None)

    def noticed(self, status: int, held: bool) -> None:
        if status:
            self.fail(status, self.t.inner.error(status, "staged landing notice"), held)
            if held:
                return
        self.end(None)

    def fail(self, status: int, exc: Exception, held: bool) -> None:
        """The write has failed: the engine fails it now, while pieces may be in flight."""
        if self.error is not None:
            return
        self.error, self.status = exc, status
        if held or self.left > 1:  # the source must stay registered until the last ends
            self.t._q.push(OpDone(self.token, status, True, exc))

    def end(self, err: Exception | None) -> None:
        """One piece is over (``err``: how it failed, None if it did not)."""
        if err is not None:
            self.fail(_status(err), err, False)
        self.left -= 1
        if self.left == 0:
            e = self.error
            self.t._q.push(OpDone(self.token, self.status if e else 0, False, e))


class StagedTransport(ForwardingTransport):
    """The staged GPU path around a transport that cannot move CUDA memory itself."""

    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})

    stage_host_tensors: bool = False
    """Test switch (CPU CI): stage CPU torch tensors as if they were GPU tensors. The
    copies between tensor and mirror are then host copies; everything else is the
    real protocol over the real provider."""

    def __init__(self, inner: Transport, *, cuda: str = "auto") -> None:
        super().__init__(inner)
        self.ctrl_max = inner.ctrl_max - StagedWrapper.ctrl_overhead
        self._cuda = cuda
        self._cuda_direct: bool | None = None  # learned at the first CUDA registration
        self._active = False
        self._closed = False
        self._waiter: CopyWaiter = None  # type: ignore[assignment]  # made on activation
        self._q = EventQueue()  # OpDone and Fatal events of our own
        self._ops: dict[int, Callable[[int, bool], None]] = {}  # internal token -> follow-up
        self._itokens = itertools.count(_INTERNAL)
        self._landing: dict[int, StagedMemory] = {}  # stage id -> a staged target of ours
        self._sids = itertools.count(1)
        self._errors = 0
        self._native: NativeOps | None = None
        # Nothing staged yet: the hot paths are the inner transport's own methods.
        self.post_write = inner.post_write  # type: ignore[method-assign]
        self.post_paged = inner.post_paged  # type: ignore[method-assign]
        self.post_batch = inner.post_batch  # type: ignore[method-assign]
        self.post_read = inner.post_read  # type: ignore[method-assign]
        self.pending_events = inner.pending_events  # type: ignore[method-assign]
        self.spin = inner.spin  # type: ignore[method-assign]
        self.counter_take_spin = inner.counter_take_spin  # type: ignore[method-assign]
        # (what this class never overrides, the counters among it, ForwardingTransport
        # has bound to the inner transport's methods already)

    def _activate(self) -> None:
        """Staging or GPU memory is needed from now on: intercept the hot paths."""
        if self._active:
            return
        self._waiter = CopyWaiter(self.inner.notify_fd)
        self._active = True
        for name in _HOT:
            self.__dict__.pop(name, None)
        if self._native is not None:
            self._native.close()  # the engine's native calls would pass us by

    def native_ops(self) -> NativeOps | None:
        # Until staging is first needed this wrapper adds nothing to the hot paths,
        # so the inner table serves; activation closes it.
        if self._active:
            return None
        if self._native is None:
            self._native = self.inner.native_ops()
        return self._native

    @property
    def cuda_path(self) -> str:
        """How CUDA tensors travel: 'direct' (FI_HMEM registration), 'staged', or
        'unknown' (cuda='auto' on a provider with FI_HMEM, before the first CUDA
        registration decided)."""
        if self._cuda == "staged" or not self.inner.hmem or self._cuda_direct is False:
            return "staged"
        return "direct" if self._cuda_direct else "unknown"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._waiter is not None:
            self._waiter.close()
        self._ops.clear()
        self.inner.close()

    def staged_memory(self, reg: Registration) -> StagedMemory | None:
        """The host mirror and copies of a staged registration (None if not staged)."""
        return reg.stage if isinstance(reg, StagedRegistration) else None

    # ------------------------------------------------------------ memory

    def register(
        self,
        ptr: int,
        nbytes: int,
        *,
        remote_write: bool,
        remote_read: bool,
        device: str = "cpu",
        device_index: int = -1,
        owner: Any = None,
    ) -> Registration:
        if device == "cuda":
            return self._register_cuda(ptr, nbytes, remote_write, remote_read, device_index, owner)
        if self.stage_host_tensors and device == "cpu" and is_tensor(owner):
            return self._register_staged(
                ptr, nbytes, remote_write, remote_read, device, device_index, owner
            )
        return self.inner.register(
            ptr,
            nbytes,
            remote_write=remote_write,
            remote_read=remote_read,
            device=device,
            device_index=device_index,
            owner=owner,
        )

    def _register_cuda(
        self,
        ptr: int,
        nbytes: int,
        remote_write: bool,
        remote_read: bool,
        device_index: int,
        owner: Any,
    ) -> Registration:
        inner = self.inner
        if self._cuda != "staged" and inner.hmem and self._cuda_direct is not False:
            try:
                reg = inner.register(
                    ptr,
                    nbytes,
                    remote_write=remote_write,
                    remote_read=remote_read,
                    device="cuda",
                    device_index=device_index,
                    owner=owner,
                )
            except TransferError as exc:
                if self._cuda == "direct":
                    raise RegionError(f"cannot register CUDA memory: {exc}") from exc
                self._cuda_direct = False  # FI_HMEM advertised, but not for CUDA: stage
            else:
                self._cuda_direct = True
                self._activate()
                if reg.device != "cuda":
                    reg = dataclasses.replace(reg, device="cuda", device_index=device_index)
                return reg
        if self._cuda == "direct":
            raise RegionError(
                f"provider {inner.provider!r} cannot register CUDA memory directly (it "
                f"{'advertises' if inner.hmem else 'does not advertise'} FI_HMEM, and no CUDA "
                "registration succeeded); open the engine with cuda='auto' to stage through host"
            )
        return self._register_staged(
            ptr, nbytes, remote_write, remote_read, "cuda", device_index, owner
        )

    def _register_staged(
        self,
        ptr: int,
        nbytes: int,
        remote_write: bool,
        remote_read: bool,
        device: str,
        device_index: int,
        owner: Any,
    ) -> Registration:
        check_stageable(owner)
        self._activate()
        stage = StagedMemory(owner, self._waiter)
        if stage.nbytes != nbytes:
            raise RegionError(
                f"the tensor holds {stage.nbytes} bytes but {nbytes} were to be registered; "
                "register the whole contiguous tensor"
            )
        mirror = self.inner.register(
            stage.host_ptr,
            stage.nbytes,
            remote_write=remote_write,
            remote_read=remote_read,
            device="cpu",
            device_index=-1,
            owner=stage.host,
        )
        sid = next(self._sids)
        if remote_write:
            self._landing[sid] = stage
        return StagedRegistration(
            handle=mirror.handle,
            keys=mirror.keys,
            bases=mirror.bases,
            ptr=ptr,
            nbytes=nbytes,
            device=device,
            device_index=device_index,
            ext=_STAGE_ID.pack(sid) + mirror.ext,
            staged=True,
            stage=stage,
            mirror=mirror,
            sid=sid,
        )

    def deregister(self, reg: Registration) -> None:
        if isinstance(reg, StagedRegistration):
            self._landing.pop(reg.sid, None)
            self.inner.deregister(reg.mirror)
        else:
            self.inner.deregister(reg)

    def remote(self, peer: int, ndom: int, target: Target) -> Remote:
        if not target.staged:
            return self.inner.remote(peer, ndom, target)
        ext = target.ext
        if len(ext) < _STAGE_ID.size:
            raise DescriptorError(
                "the descriptor says its region is staged but carries no stage id; it was "
                "made by an incompatible asyncfabric or is damaged"
            )
        (sid,) = _STAGE_ID.unpack_from(ext)
        inner = self.inner.remote(
            peer, ndom, dataclasses.replace(target, ext=ext[_STAGE_ID.size :])
        )
        self._activate()
        return StagedRemote(peer, ndom, target, inner, sid)

    # ------------------------------------------------------------ transfers (once active)

    def post_write(  # type: ignore[override]
        self,
        token: int,
        dst: Remote,
        roff: int,
        src: Registration | None,
        soff: int,
        nbytes: int,
        imm: int,
        stream: Any = None,
    ) -> bool:
        if nbytes:
            assert src is not None
            if src.staged or dst.__class__ is StagedRemote:
                return self._staged_write(token, dst, roff, src, soff, nbytes, imm, stream)
            if src.device == "cuda":
                return self._direct_write(token, dst, roff, src, soff, nbytes, imm, stream)
        elif dst.__class__ is StagedRemote:
            dst = dst.inner  # type: ignore[attr-defined]  # an immediate alone needs no copy
        return self.inner.post_write(token, dst, roff, src, soff, nbytes, imm, stream)

    def post_paged(self, op: PagedWrite) -> bool:  # type: ignore[override]
        if op.src.staged or op.dst.__class__ is StagedRemote:
            raise RegionError(
                "write_paged does not take staged GPU regions (source or destination); "
                "register the GPU memory on a provider with FI_HMEM CUDA support "
                "(cuda='direct'), use the cuda_ipc backend between processes of one host, or "
                "write each contiguous run with write()"
            )
        return self.inner.post_paged(op)

    def post_batch(self, batch: WriteBatch) -> bool:  # type: ignore[override]
        # GPU sources and staged targets need this wrapper's own write path (stream
        # order, staging): the contract's fallback posts each entry through it.
        if any(r is not None and (r.staged or r.device == "cuda") for r in batch.srcs) or any(
            d.__class__ is StagedRemote for d in batch.dsts
        ):
            return post_batch_each(self, batch)
        return self.inner.post_batch(batch)

    def post_read(  # type: ignore[override]
        self, token: int, src: Remote, roff: int, dst: Registration, doff: int, nbytes: int
    ) -> bool:
        if dst.staged or src.__class__ is StagedRemote:
            raise Unsupported(
                "a one-sided read does not take staged GPU regions (either side); read into "
                "host memory, register the GPU memory on a provider with FI_HMEM CUDA support "
                "(cuda='direct'), or have the peer write instead"
            )
        return self.inner.post_read(token, src, roff, dst, doff, nbytes)

    def post_send(self, token: int, peer: int, data: bytes) -> bool:
        return self.inner.post_send(token, peer, _USER + data)

    def _internal(self, fn: Callable[[int, bool], None]) -> int:
        tok = next(self._itokens)
        self._ops[tok] = fn
        return tok

    def _ordered(
        self, src: Registration, stream: Any, then: Callable[[Exception | None], None]
    ) -> bool:
        """Order a read of direct CUDA ``src`` after its producer stream.

        True: the producer's work is done, go ahead now. False: ``then`` runs on
        the event-loop thread once it is (no host thread waits)."""
        import torch

        prod = producer_stream(src.device_index, stream)
        ev = torch.cuda.Event()
        ev.record(prod)
        if ev.query():
            return True
        self._waiter.when_done(ev, then, prod.device.index)
        return False

    def _direct_write(
        self,
        token: int,
        dst: Remote,
        roff: int,
        src: Registration,
        soff: int,
        nbytes: int,
        imm: int,
        stream: Any,
    ) -> bool:
        later = partial(self._post_later, token, dst, roff, src, soff, nbytes, imm)
        if self._ordered(src, stream, later):
            return self.inner.post_write(token, dst, roff, src, soff, nbytes, imm, stream)
        return False

    def _post_later(
        self,
        token: int,
        dst: Remote,
        roff: int,
        src: Registration,
        soff: int,
        nbytes: int,
        imm: int,
        err: Exception | None,
    ) -> None:
        if err is not None:
            self._q.push(OpDone(token, _status(err), False, err))
            return
        if self._closed:
            return
        try:
            done = self.inner.post_write(token, dst, roff, src, soff, nbytes, imm, None)
        except Exception as exc:
            self._q.push(OpDone(token, _status(exc), False, exc))
            return
        if done:
            self._q.push(OpDone(token))

    def _staged_write(
        self,
        token: int,
        dst: Remote,
        roff: int,
        src: Registration,
        soff: int,
        nbytes: int,
        imm: int,
        stream: Any,
    ) -> bool:
        step = piece_bytes(dst.chunk, PIECE_BYTES)
        pieces = [(o, min(step, nbytes - o)) for o in range(0, nbytes, step)]
        if isinstance(src, StagedRegistration):
            stage: StagedMemory = src.stage
            op = _StagedWrite(self, token, dst, roff, src.mirror, soff, pieces, imm)
            prod = producer_stream(stage.device_index, stream) if stage.on_gpu else None
            try:
                evs = stage.d2h(soff, pieces, prod)
            except Exception as exc:  # nothing posted yet: fail the call itself
                raise CopyFailed(
                    f"the staged device-to-host copy of {nbytes} bytes could not be queued: {exc}"
                ) from exc
            w = self._waiter
            for k, ev in enumerate(evs):
                try:
                    w.when_done(ev, partial(op.post, k), stage.device_index)
                except Exception as exc:
                    for _ in range(k, len(evs)):
                        op.end(exc)
                    break
            return False
        op = _StagedWrite(self, token, dst, roff, src, soff, pieces, imm)
        if src.device != "cuda" or self._ordered(src, stream, op.post_all):
            op.post_all()
        return False

    # ------------------------------------------------------------ events

    def drain(self) -> list[Event]:
        if self._active:
            return self._drain_active()
        evs = self.inner.drain()
        for ev in evs:  # the common case: no message among them, nothing to do
            if ev.__class__ is Message:
                return self._sift(evs)
        return evs

    def _drain_active(self) -> list[Event]:
        # Follow-ups post to the inner transport (the next piece, a landing notice) and
        # give to its counters from inside this drain. Events those calls cause are
        # not rung (the caller is expected to drain on the way out), so drain again
        # while any are pending; under a flood, ring the notify fd and come back.
        w, inner = self._waiter, self.inner
        evs: list[Event] = []
        for _ in range(_DRAIN_ROUNDS):
            w.run_done()
            got = inner.drain()
            if got:
                evs += self._sift(got)
            if not (inner.pending_events() or w.pending()):
                break
        else:
            self._ring()
        if len(self._q):
            evs += self._q.take()
        return evs

    def _ring(self) -> None:
        try:
            os.eventfd_write(self.inner.notify_fd, 1)
        except OSError:
            pass

    def _sift(self, evs: list[Event]) -> list[Event]:
        """Unframe user messages; keep landing notices and internal completions to ourselves."""
        keep: list[Event] | None = None
        # (a fallback batch's sub-tokens, SUB_BIT set, are the engine's, not internal)
        message, opdone, internal, sub, user = Message, OpDone, _INTERNAL, SUB_BIT, _USER
        for i, ev in enumerate(evs):
            cls = ev.__class__
            if cls is message:
                d = ev.data  # type: ignore[union-attr]
                if d[:1] == user:
                    ev.data = d[1:]  # type: ignore[union-attr]
                    if keep is not None:
                        keep.append(ev)
                    continue
                self._control(d)
            elif cls is opdone and internal <= ev.token < sub:  # type: ignore[union-attr]
                self._internal_done(ev)  # type: ignore[arg-type]
            else:
                if keep is not None:
                    keep.append(ev)
                continue
            if keep is None:
                keep = evs[:i]
        return evs if keep is None else keep

    def _internal_done(self, ev: OpDone) -> None:
        fn = self._ops.get(ev.token) if ev.held else self._ops.pop(ev.token, None)
        if fn is not None:
            fn(ev.status, ev.held)

    def _control(self, d: bytes) -> None:
        if d[:1] != _LANDED_TAG or len(d) != LANDING_NOTICE_BYTES:
            self._errors += 1  # not ours to understand: a peer of another version?
            return
        sid, off, n, imm, count = _LANDED.unpack_from(d, 1)
        stage = self._landing.get(sid)
        if stage is None or off + n > stage.nbytes or count < 0:
            self._errors += 1  # the region was unregistered meanwhile: nothing to copy into
            return
        try:
            ev = stage.h2d(off, n)
        except Exception as exc:
            self._credit(
                imm,
                count,
                CopyFailed(
                    f"the staged host-to-device copy of {n} bytes could not be queued: {exc}"
                ),
            )
            return
        if ev.__class__ is HostEvent and ev.error is None:
            self._credit(imm, count, None)
            return
        try:
            self._waiter.when_done(ev, partial(self._credit, imm, count), stage.device_index)
        except Exception as exc:
            self._credit(imm, count, exc)

    def _credit(self, imm: int, count: int, err: Exception | None) -> None:
        """A landed piece is in GPU memory (or failed to get there): count its immediates."""
        if err is not None:
            self._errors += 1
            if not isinstance(err, CopyFailed):
                err = CopyFailed(f"the staged host-to-device copy failed: {err}")
            # A counter will never see these immediates: every wait must fail, now.
            self._q.fatal(err)
            return
        if count and imm >= 0 and not self._closed:
            self.inner.counter_give(imm, count)

    def pending_events(self) -> int:  # type: ignore[override]
        return self.inner.pending_events() + len(self._q) + self._waiter.pending()

    def spin(self, ns: int) -> bool:  # type: ignore[override]
        if len(self._q) or self._waiter.pending():
            return True
        return bool(self.inner.spin(ns)) or bool(self._waiter.pending())

    def counter_take_spin(self, imm: int, want: int, ns: int) -> int:  # type: ignore[override]
        if len(self._q) or self._waiter.pending():
            return self.inner.counter_take_spin(imm, want, 0) | EVENTS_READY
        r = self.inner.counter_take_spin(imm, want, ns)
        if len(self._q) or self._waiter.pending():
            r |= EVENTS_READY
        return r

    def stats(self) -> dict[str, int]:
        st = self.inner.stats()
        st["staging_errors"] = self._errors
        st["staged_regions"] = len(self._landing)
        return st


class StagedWrapper(Wrapper):
    """Entry point ``asyncfabric.wrappers: staged``: the staged GPU path."""

    name = "staged"
    ctrl_overhead = 1  # the framing byte: user message or landing notice

    def wrap(self, transport: Transport, *, cuda: str) -> Transport:
        if transport.cuda_native:
            return transport  # cuda_ipc moves CUDA memory itself, and frames nothing
        return StagedTransport(transport, cuda=cuda)
