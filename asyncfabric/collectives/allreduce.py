"""All-reduce (sum) over one-sided writes, exact or with int8 block quantization.

Two algorithms, picked by size (``oneshot_bytes``, measured: docs/collectives.md):

* one-shot: every rank writes its whole tensor to every peer, and each sums
  the P contributions itself, in rank order;
* two-shot: the tensor is cut into P chunks; reduce-scatter (every rank writes
  chunk k to rank k, which sums it in rank order), then all-gather (rank k
  writes the summed chunk k to every peer). Tensors larger than one round of
  scratch go round after round.

Both are pipelined: a chunk travels as pieces, each its own write and counter,
so the sender quantizes piece j+1 while piece j is on the wire and the
receiver reduces piece j while j+1 arrives.

With ``quant="int8"`` every value is quantized before it is sent (int8, one
bf16 scale per ``block`` values), dequantized on arrival and accumulated in
fp32; the reduced chunk is quantized again for the gather (two-shot; one-shot
sends no sum, so its sum is not quantized). Every rank ends with bitwise the
same result: a rank uses the same dequantized values for its own contribution
(one-shot) or its own chunk (two-shot) that its peers receive.

Reuse of the scratch across calls without a handshake: a rank starts call k+1
only after it got every peer's last write of call k, which each peer sent only
after it had consumed what it received in call k (see docs/collectives.md,
"why one set of buffers is enough"). Rounds of one call overlap under the same rule,
piece by piece: round k+1's piece j goes to rank s once s's gather piece j of round k is
in and copied out; the one-shot area and the header have two
parities because there a peer may still be reading call k's data.
"""

from __future__ import annotations

import asyncio
import struct
import time
import weakref
import zlib
from typing import Any

import numpy as np

import asyncfabric as af

from . import _kernels as K
from .errors import CollectiveError, CollectiveMismatch, CollectiveTimeout
from .layout import (
    AG,
    HDR,
    HDR_BYTES,
    MAX_INDEX,
    MAX_RANKS,
    MAX_SLOT,
    RS,
    Span,
    align8,
    chunks,
    imm,
    pieces,
    wire_bytes,
)
from .tensors import F32, ITEMSIZE, NAMES, Flat, flat

_HEADER = struct.Struct("<4sIQBBHII")
_MAGIC = b"AFAR"
_QUANTS = {None: 0, "int8": 1}

#: Values per two-shot round (scratch is sized for it once per view).
ROUND_ELEMS = 4 << 20
#: Values per pipeline piece.
#: Values per pipeline piece (tcp, 2 ranks: 1 Mi against 128 Ki took 36-38 % less CPU a
#: call at 4 and 16 MiB; docs/collectives.md).
PIECE_ELEMS = 1 << 20
#: The one-shot area holds this many values (the threshold cannot exceed it).
ONESHOT_CAP = 64 << 10
#: Inputs up to this many bytes go one-shot; measured (docs/collectives.md).
ONESHOT_BYTES = 64 << 10


class AllReduce:
    """The all-reduce of one view: its registered scratch and peers' descriptors.

    Build one per view (or let :func:`all_reduce` keep one per view and
    ``slot``); every rank of the view must build it and call it in the same
    order. ``slot`` (0..255) separates instances on one engine (immediate bits
    20..27). Calls on one instance run one at a time.
    """

    def __init__(
        self,
        view: Any,
        *,
        slot: int = 0,
        round_elems: int = ROUND_ELEMS,
        piece_elems: int = PIECE_ELEMS,
        oneshot_bytes: int = ONESHOT_BYTES,
    ) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot <= MAX_SLOT:
            raise ValueError(f"slot must be an int from 0 to {MAX_SLOT}, got {slot!r}")
        if not 2 <= view.size <= MAX_RANKS:
            raise ValueError(
                f"all_reduce runs on views of 2 to {MAX_RANKS} ranks, this one has {view.size}"
            )
        if oneshot_bytes < 0 or oneshot_bytes > ONESHOT_CAP * 2:
            raise ValueError(f"oneshot_bytes must be from 0 to {ONESHOT_CAP * 2}")
        self.view = view
        self.slot = slot
        self.P = int(view.size)
        self.rank = int(view.rank)
        self._eng: af.Engine = view.engine
        self.round_elems = round_elems
        self.piece = piece_elems
        self.oneshot_bytes = oneshot_bytes
        self.chunk_cap = -(-round_elems // self.P) + 1024
        if piece_elems < 1 or -(-self.chunk_cap // piece_elems) > MAX_INDEX // 2:
            raise ValueError("round_elems / piece_elems gives too many pieces per chunk")
        # piece j of a chunk sits at j * 4 * piece (fp32 raw is the widest wire form;
        # int8 of a piece under 8 values can pass 4 bytes a value: the 64 bytes of slack)
        self.slot_bytes = 4 * self.chunk_cap + 64
        # a one-shot slot: the call's header, then (one-shot calls) the data, one write
        self.one_bytes = HDR_BYTES + align8(4 * ONESHOT_CAP)
        P = self.P
        # receive area: header + one-shot slots (2 parities), RS slots, AG slots
        self.r_one = 0
        self.r_rs = 2 * P * self.one_bytes
        self.r_ag = self.r_rs + P * self.slot_bytes
        rsize = self.r_ag + P * self.slot_bytes
        # send area: header + one-shot data, RS (one slot per destination), AG (one slot)
        self.s_one = 0
        self.s_rs = self.one_bytes
        self.s_ag = self.s_rs + P * self.slot_bytes
        ssize = self.s_ag + self.slot_bytes
        self._rbuf: np.ndarray = af.host_zeros(rsize, np.uint8)  # huge pages for CMA
        self._sbuf: np.ndarray = af.host_zeros(ssize, np.uint8)
        self._rptr = int(self._rbuf.ctypes.data)
        self._sptr = int(self._sbuf.ctypes.data)
        self._recv: af.Region | None = None
        self._send: af.Region | None = None
        self._rdesc: list[af.Descriptor] = []
        self._acc: np.ndarray | None = None  # fp32 sum of a 16-bit one-shot int8 call
        self._seq = 0
        self._busy = False
        self._broken: str | None = None
        self._failure: BaseException | None = None
        self._writes: list[asyncio.Task[None]] = []
        # the writes that last read each send slot: reduce-scatter (rank, piece), gather piece
        self._rs_w: dict[tuple[int, int], list[asyncio.Task[None]]] = {}
        self._ag_w: dict[int, list[asyncio.Task[None]]] = {}
        self._main: asyncio.Task[Any] | None = None
        self._deadline: float | None = None
        self._timeout: float | None = None
        #: set to a list to record (perf_counter, event, round, piece) of every call
        #: (diagnostics: ``asyncfabric bench allreduce --trace``)
        self.trace: list[tuple[float, str, int, int]] | None = None
        self._rnd = 0

    # ------------------------------------------------------------------ setup

    async def _setup(self, timeout: float | None) -> None:
        self._recv = self._eng.register(self._rbuf)
        self._send = self._eng.register(self._sbuf)
        try:
            descs = await self.view.allgather(bytes(self._recv.descriptor()), timeout=timeout)
        except af.MemberLost:
            raise
        except (af.ImmTimeout, TimeoutError, af.GroupError):
            raise CollectiveTimeout(
                f"not every rank of the view made its first all_reduce call within "
                f"timeout={timeout} s (the first call registers the scratch and swaps "
                "descriptors): every rank must call it"
            ) from None
        self._rdesc = [af.Descriptor.from_bytes(d) for d in descs]

    def close(self) -> None:
        """Unregister the scratch (the instance is unusable afterwards)."""
        for r in (self._recv, self._send):
            if r is not None and not r.closed:
                r.close()
        self._broken = self._broken or "it was closed"

    # ------------------------------------------------------------------ public

    async def __call__(
        self,
        tensor: Any,
        *,
        out: Any = None,
        quant: str | None = None,
        block: int = 32,
        timeout: float | None = None,
    ) -> Any:
        """Sum ``tensor`` over the view into ``out`` (default: in place); returns it."""
        if quant not in _QUANTS:
            raise ValueError(f"quant must be None or 'int8', got {quant!r}")
        if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= 1024:
            raise ValueError(f"block must be an int from 1 to 1024 values, got {block!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        cuda = _is_cuda(tensor)
        if cuda:  # host staging: see docs/collectives.md (GPU)
            host = tensor.detach().to("cpu")
            await self(host, quant=quant, block=block, timeout=timeout)
            dst = tensor if out is None else out
            dst.copy_(host)
            return dst
        x = flat(tensor)
        y = x if out is None else flat(out, "out")
        if out is not None and (y.numel != x.numel or y.dtype != x.dtype):
            raise ValueError(
                f"out has {y.numel} {NAMES[y.dtype]} values but tensor has {x.numel} "
                f"{NAMES[x.dtype]}; give an out of the tensor's size and dtype"
            )
        if self._broken is not None:
            raise CollectiveError(
                f"this all-reduce cannot run: {self._broken}; the ranks' buffers may hold "
                "stale data, so build a new view (or a new AllReduce on another slot)"
            )
        if self._busy:
            raise CollectiveError(
                "another all_reduce is running on this view and slot; calls on one "
                "instance run one at a time (await it, or use another slot)"
            )
        self._busy = True
        self._main = None
        self._failure = None
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if self._recv is None:
                await self._setup(timeout)
            await self.view.guard(self._run(x, y, _QUANTS[quant], block))
        except asyncio.CancelledError:
            if self._failure is None:
                self._broken = "an earlier call was cancelled midway"
                raise
            # we cancelled the task running _run (view.guard runs it in its own task;
            # when that is this task, take our cancellation back)
            if self._main is asyncio.current_task():
                uncancel = getattr(self._main, "uncancel", None)  # Python >= 3.11
                if uncancel is not None:
                    uncancel()
            self._broken = f"an earlier call failed ({self._failure})"
            raise CollectiveError(
                f"all_reduce failed on rank {self.rank}: a write to a peer failed: {self._failure}"
            ) from self._failure
        except BaseException as exc:
            self._broken = f"an earlier call failed ({exc})"
            raise
        finally:
            self._busy = False
            if self._main is not None and self._main is not asyncio.current_task():
                self._main.cancel()  # the guarded task, if a failure left it running
            for t in self._writes:
                if not t.done():
                    t.cancel()
            self._writes = []
            self._rs_w.clear()
            self._ag_w.clear()
        return tensor if out is None else out

    # ------------------------------------------------------------------ plumbing

    def _ev(self, what: str, j: int = -1) -> None:
        if self.trace is not None:
            self.trace.append((time.perf_counter(), what, self._rnd, j))

    def _left(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def _post(self, soff: int, nbytes: int, dst: int, doff: int, value: int) -> asyncio.Task[None]:
        assert self._send is not None
        w = self._eng.write(
            self._send[soff : soff + nbytes], self._rdesc[dst][doff : doff + nbytes], imm=value
        )
        t = asyncio.ensure_future(w)
        t.add_done_callback(self._on_write)
        self._writes.append(t)
        return t

    @staticmethod
    async def _free(ts: list[asyncio.Task[None]] | None) -> None:
        """Wait until the writes that last read a send slot are done with it."""
        for t in ts or ():
            if not t.done():
                await asyncio.shield(t)

    def _on_write(self, t: asyncio.Task[None]) -> None:
        if t.cancelled():
            return
        exc = t.exception()
        if exc is not None and self._failure is None and self._main is not None:
            self._failure = exc
            self._main.cancel()

    async def _wait(self, phase: int, src: int, index: int, nbytes: int) -> None:
        n = self._rdesc[self.rank].expected_imms(nbytes)
        c = self._eng.counter(imm(self.slot, phase, src, index))
        try:
            await c.wait(n, timeout=self._left())
        except af.ImmTimeout:
            what = {HDR: "header (and one-shot)", RS: "reduce-scatter", AG: "all-gather"}
            raise CollectiveTimeout(
                f"rank {src} ({self.view.names[src]}) did not deliver its {what[phase]} "
                f"data to rank {self.rank} within timeout={self._timeout} s: it is slow, "
                "dead, or did not make the same all_reduce call"
            ) from None

    async def _drain_writes(self) -> None:
        ws, self._writes = self._writes, []
        if ws:
            await asyncio.gather(*ws)

    # ------------------------------------------------------------------ header

    def _header(self, x: Flat, quant: int, block: int) -> bytes:
        crc = zlib.crc32(repr(x.shape).encode())
        return _HEADER.pack(_MAGIC, self._seq, x.numel, x.dtype, quant, block, crc, self.P)

    def _post_header(self, hdr: bytes, parity: int, nbytes: int) -> None:
        """The call's first write to each peer: the header, and one-shot data after it."""
        self._sbuf[self.s_one : self.s_one + len(hdr)] = np.frombuffer(hdr, np.uint8)
        off = self.r_one + (parity * self.P + self.rank) * self.one_bytes
        for d in _after(self.rank, self.P):
            self._post(self.s_one, nbytes, d, off, imm(self.slot, HDR, self.rank, parity))

    async def _check_headers(self, hdr: bytes, parity: int) -> None:
        mine = _HEADER.unpack(hdr)
        for s in range(self.P):
            if s == self.rank:
                continue
            await self._wait(HDR, s, parity, len(hdr))
            off = self.r_one + (parity * self.P + s) * self.one_bytes
            theirs = _HEADER.unpack(bytes(self._rbuf[off : off + len(hdr)]))
            if theirs != mine:
                raise CollectiveMismatch(
                    f"rank {s} ({self.view.names[s]}) called all_reduce with "
                    f"{_describe(theirs)} but rank {self.rank} with {_describe(mine)}: every "
                    "rank must pass a tensor of the same shape and dtype, with the same quant "
                    "and block, in the same order of calls"
                )

    # ------------------------------------------------------------------ algorithms

    async def _run(self, x: Flat, y: Flat, quant: int, block: int) -> None:
        self._main = asyncio.current_task()  # a failed write cancels it (_on_write)
        self._seq += 1
        parity = self._seq & 1
        hdr = self._header(x, quant, block)
        wire = wire_bytes(x.numel, ITEMSIZE[x.dtype], bool(quant), block)
        self._rnd = 0
        self._ev("call")
        if x.nbytes <= self.oneshot_bytes and x.numel <= ONESHOT_CAP and self._one_write(wire):
            await self._oneshot(x, y, quant, block, hdr, parity, wire)
        else:
            self._post_header(hdr, parity, len(hdr))
            rounds = [
                (a, min(self.round_elems, x.numel - a))
                for a in range(0, max(1, x.numel), self.round_elems)
            ]
            early: set[tuple[int, int]] = set()
            for i, (a, m) in enumerate(rounds):
                nxt = rounds[i + 1] if i + 1 < len(rounds) else None
                early = await self._round(x, y, a, m, nxt, quant, block, hdr, parity, early)
                self._rnd += 1
        await self._drain_writes()
        self._ev("end")

    def _one_write(self, wire: int) -> bool:
        """Whether header + one-shot data is one chunk at every rank (one immediate), so
        the header's count is 1 whatever a mismatched peer sends."""
        return HDR_BYTES + wire <= min(d.chunk_bytes for d in self._rdesc)

    async def _oneshot(
        self, x: Flat, y: Flat, quant: int, block: int, hdr: bytes, parity: int, wire: int
    ) -> None:
        P, r, n = self.P, self.rank, x.numel
        sp = self._sptr + self.s_one + HDR_BYTES
        if quant:
            K.quantize(x.ptr, x.dtype, n, block, sp, sp + align8(n))
        else:
            K.convert(x.ptr, x.dtype, sp, x.dtype, n, False)
        self._post_header(hdr, parity, HDR_BYTES + wire)
        # let the writes post before any wait: a wait may be answered at once and a
        # mismatch raise, and peers must still get our header to fail too
        await asyncio.sleep(0)
        await self._check_headers(hdr, parity)  # the data came with each header
        srcs = []
        for s in range(P):
            if s != r:
                srcs.append(self._rptr + self.r_one + (parity * P + s) * self.one_bytes + HDR_BYTES)
            else:  # int8: my own contribution as the peers see it, so all ranks agree
                srcs.append(sp if quant else x.ptr)
        if not quant:
            K.reduce(srcs, r, x.dtype, False, n, block, 0, y.ptr)
            return
        # int8: every rank sums the same P dequantized contributions in the same order, so
        # all agree bit for bit without quantizing the sum once more (which two-shot's
        # gather needs and one-shot does not: it would only add a third rounding)
        if y.dtype == F32:
            acc = y.ptr
        else:
            if self._acc is None:
                self._acc = np.empty(ONESHOT_CAP, np.float32)
            acc = int(self._acc.ctypes.data)
        for k, src in enumerate(srcs):
            K.dequantize(src, src + align8(n), n, block, acc, F32, k > 0)
        if y.dtype != F32:
            K.convert(acc, F32, y.ptr, y.dtype, n, False)

    def _piece(self, block: int) -> int:
        """Values per pipeline piece: ``self.piece`` rounded down to whole blocks."""
        return max(block, self.piece // block * block)

    def _cut(self, m: int, block: int) -> list[list[Span]]:
        """A round of ``m`` values: every rank's chunk, as pipeline pieces."""
        return [pieces(c, self._piece(block)) for c in chunks(m, self.P, block)]

    def _send_rs(self, x: Flat, base: int, sp: Span, d: int, j: int, q: bool, block: int) -> None:
        """Encode piece ``j`` of chunk ``d`` (round at ``base``) and write it to rank ``d``."""
        isz = ITEMSIZE[x.dtype]
        pw = 4 * self._piece(block)
        soff = self.s_rs + d * self.slot_bytes + j * pw
        self._encode(x.ptr + (base + sp.start) * isz, x.dtype, sp.numel, q, block, soff)
        doff = self.r_rs + self.rank * self.slot_bytes + j * pw
        wire = wire_bytes(sp.numel, isz, q, block)
        self._rs_w[d, j] = [self._post(soff, wire, d, doff, imm(self.slot, RS, self.rank, j))]
        self._ev("rs_post", j)

    async def _round(
        self,
        x: Flat,
        y: Flat,
        base: int,
        m: int,
        nxt: tuple[int, int] | None,
        quant: int,
        block: int,
        hdr: bytes,
        parity: int,
        early: set[tuple[int, int]],
    ) -> set[tuple[int, int]]:
        """One round; returns the (rank, piece) of the next round's reduce-scatter
        pieces it already sent (each as soon as that slot was free at the peer)."""
        P, r, dt = self.P, self.rank, x.dtype
        isz = ITEMSIZE[dt]
        q = bool(quant)
        pw = 4 * self._piece(block)
        cut = self._cut(m, block)
        # 1. reduce-scatter sends: piece by piece, to every peer in turn (those the
        #    previous round did not send already)
        for j in range(max(len(p) for p in cut)):
            for d in _after(r, P):
                if j >= len(cut[d]) or (d, j) in early:
                    continue
                await self._free(self._rs_w.get((d, j)))
                self._send_rs(x, base, cut[d][j], d, j, q, block)
            await asyncio.sleep(0)  # let the writes post while the next piece is encoded
        if base == 0:
            await self._check_headers(hdr, parity)
            self._ev("hdr")
        # 2. reduce my chunk piece by piece in rank order (one fused kernel: sum, encode
        #    for the gather, and my own chunk of the output); send each reduced piece on
        for j, sp in enumerate(cut[r]):
            wire = wire_bytes(sp.numel, isz, q, block)
            srcs = []
            for s in range(P):
                if s == r:
                    srcs.append(x.ptr + (base + sp.start) * isz)
                else:
                    await self._wait(RS, s, j, wire)
                    self._ev("rs_in", j)
                    srcs.append(self._rptr + self.r_rs + s * self.slot_bytes + j * pw)
            soff = self.s_ag + j * pw
            await self._free(self._ag_w.get(j))
            ypiece = y.ptr + (base + sp.start) * isz
            K.reduce(srcs, r, dt, q, sp.numel, block, self._sptr + soff, ypiece)
            self._ev("reduced", j)
            self._ag_w[j] = [
                self._post(
                    soff,
                    wire,
                    d,
                    self.r_ag + r * self.slot_bytes + j * pw,
                    imm(self.slot, AG, r, j),
                )  # fmt: skip
                for d in _after(r, P)
            ]
            self._ev("ag_post", j)
            await asyncio.sleep(0)
        # 3. the gathered chunks. Rank s sent its piece j after it had reduced (consumed)
        #    my reduce-scatter piece j, and I copy it out here: so both of my slots j at
        #    s are free, and the next round's piece j for s goes out now, behind the
        #    gather still on the wire, instead of after the whole round (the link would
        #    idle between rounds; docs/collectives.md, "Rounds overlap")
        ncut = None if nxt is None else self._cut(nxt[1], block)
        sent: set[tuple[int, int]] = set()
        for j in range(max(len(p) for p in cut)):
            for s in _after(r, P):
                if j >= len(cut[s]):
                    continue
                sp = cut[s][j]
                wire = wire_bytes(sp.numel, isz, q, block)
                await self._wait(AG, s, j, wire)
                self._ev("ag_in", j)
                p = self._rptr + self.r_ag + s * self.slot_bytes + j * pw
                self._decode(p, sp.numel, q, block, y.ptr + (base + sp.start) * isz, dt, False, dt)
                if nxt is not None and ncut is not None and j < len(ncut[s]):
                    await self._free(self._rs_w.get((s, j)))
                    self._send_rs(x, nxt[0], ncut[s][j], s, j, q, block)
                    sent.add((s, j))
        self._ev("decoded")
        return sent

    def _encode(self, src: int, dt: int, n: int, q: bool, block: int, soff: int) -> None:
        """``n`` values of ``dt`` at ``src`` into the send area at ``soff``, in wire form."""
        p = self._sptr + soff
        if q:
            K.quantize(src, dt, n, block, p, p + align8(n))
        else:
            K.convert(src, dt, p, dt, n, False)

    @staticmethod
    def _decode(
        p: int, n: int, q: bool, block: int, dst: int, dst_dt: int, add: bool, wire_dt: int
    ) -> None:
        if q:
            K.dequantize(p, p + align8(n), n, block, dst, dst_dt, add)
        else:
            K.convert(p, wire_dt, dst, dst_dt, n, add)


def _after(r: int, P: int) -> list[int]:
    """The other ranks, starting after ``r`` (so not every rank hits rank 0 first)."""
    return [(r + k) % P for k in range(1, P)]


def _describe(h: tuple[Any, ...]) -> str:
    _, seq, numel, dt, quant, block, crc, P = h
    qn = {0: "quant=None", 1: f"quant='int8' block={block}"}.get(quant, f"quant code {quant}")
    return f"{numel} {NAMES.get(dt, dt)} values (shape crc {crc:08x}), {qn}, call #{seq}"


def _is_cuda(t: Any) -> bool:
    return type(t).__module__.startswith("torch") and getattr(t, "is_cuda", False)


_instances: weakref.WeakKeyDictionary[Any, dict[int, AllReduce]] = weakref.WeakKeyDictionary()


async def all_reduce(
    tensor: Any,
    view: Any,
    *,
    out: Any = None,
    quant: str | None = None,
    block: int = 32,
    timeout: float | None = None,
    slot: int = 0,
) -> Any:
    """Sum ``tensor`` over every rank of ``view`` (a frozen group view), in place or into ``out``.

    ``quant="int8"``: values travel as int8 with one bf16 scale per ``block``
    values, accumulated in fp32 (docs/collectives.md gives the error bound).
    Without it the sum is exact in fp32, in rank order 0, 1, ..., P-1, then
    rounded once to the tensor's dtype. Every rank must make the same calls in
    the same order; mismatched shapes, dtypes or options raise
    :class:`CollectiveMismatch` on every rank. A dead or missing rank fails the
    call (:class:`CollectiveError`, ``af.MemberLost`` from the view, or
    :class:`CollectiveTimeout` after ``timeout``). The view's scratch is
    registered on the first call (one instance per view and ``slot``).
    """
    per = _instances.setdefault(view, {})
    ar = per.get(slot)
    if ar is None:
        ar = per[slot] = AllReduce(view, slot=slot)
    return await ar(tensor, out=out, quant=quant, block=block, timeout=timeout)
