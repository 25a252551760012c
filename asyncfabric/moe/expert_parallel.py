"""ExpertParallel: dispatch tokens to the ranks holding their experts, combine the outputs.

One object per rank of a frozen group view. Every buffer is allocated and registered when
the group is created, and the descriptors are exchanged once; a dispatch or combine then
posts one batch of writes (per destination rank: one entry, ``El`` entries, or in a
low-latency dispatch one per run of consecutive token ids, built from arrays) and counts
what arrives per source rank with immediates in the moe nibble (0x4). Nothing orders the
writes: each phase knows how many immediates each source owes. A low-latency dispatch sends
each token once per destination rank, however many of its experts live there.

With ``quant="fp8"`` a dispatched row travels as e4m3 with its fp32 scale appended (one
scale per token, see :mod:`asyncfabric.moe.fp8`): the same rows, the same writes and
counts, fewer bytes; the receiver dequantizes before handing the rows to the experts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch

import asyncfabric as af

from . import fp8
from .errors import MoEError, MoEInputError, RankLost
from .layout import (
    RecvLayout,
    Reduction,
    Route,
    ll_layout,
    packed_targets,
    partial_tokens,
    recv_layout,
    reduce_rows,
    reduction,
    route,
    token_runs,
    weighted_sum,
)

T = TypeVar("T")
Mode = Literal["low_latency", "high_throughput"]
MODES = ("low_latency", "high_throughput")
Quant = Literal["fp8"]
QUANTS = ("fp8",)
Combine = Literal["exact", "reduced"]
COMBINES = ("exact", "reduced")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Immediate layout: 0x4 (moe) in bits 28..31, the instance slot in 20..27, the phase in
# 16..19 and the source rank in 0..15, so each (phase, source) has its own counter.
_NIBBLE = 0x4 << 28
_META, _DATA, _BACK = 1, 2, 3
#: What ``combine`` does in low-latency mode unless told (docs/moe.md: measured).
DEFAULT_COMBINE: Combine = "exact"
# fp32 scratch for pre-reduced partials: this many bytes of rows at a time
_RED_BLOCK_BYTES = 2 << 20


def _buffer(shape: tuple[int, int], dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    """A registered buffer: host memory on huge pages (shm's copies pin 2 MiB at a time)."""
    t: torch.Tensor = af.host_zeros(shape, dtype, dev)
    return t


@dataclass
class _Partials:
    """What a reduced combine needs from its dispatch, per source: the flat (token * topk
    + j) index and the router weight (fp32) of each row this rank got, in its send order."""

    flats: list[np.ndarray]
    weights: list[np.ndarray]


class View(Protocol):
    """What ExpertParallel needs from a frozen group view (``g.wait_for(n)``)."""

    @property
    def rank(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def engine(self) -> af.Engine: ...
    async def allgather(self, data: bytes, timeout: float | None = None) -> list[bytes]: ...
    async def guard(self, aw: Awaitable[T]) -> T: ...


@dataclass
class Dispatched:
    """This rank's share of a dispatch: rows grouped by local expert.

    ``x[:counts[0]]`` are expert ``experts[0]``'s tokens (from every source, by source
    rank then token order), and so on. ``x`` stays valid until the next ``combine``.
    """

    x: torch.Tensor  # [N, hidden]
    counts: list[int]  # rows per local expert
    experts: range  # global ids of the local experts
    #: With ``quant="fp8"``: the rows as they arrived, e4m3 ``[N, hidden]`` (``x`` is
    #: ``q.float() * scales[:, None]`` in the group's dtype) and their per-token fp32 scales
    #: ``[N]``, for experts that take fp8 (valid until the next dispatch).
    q: torch.Tensor | None = None
    scales: torch.Tensor | None = None

    def split(self) -> list[torch.Tensor]:
        """``x`` cut into one tensor per local expert."""
        return list(torch.split(self.x, self.counts))


class ExpertParallel:
    """An expert-parallel group: ``num_experts`` experts split evenly over the view's ranks.

    Create it with ``await ExpertParallel.create(view, ...)`` on every rank with the same
    arguments. Then per MoE layer, on every rank: ``d = await ep.dispatch(x, topk_idx,
    topk_weights)``, run each local expert on ``d.split()``, and ``out = await
    ep.combine(expert_out)`` (rows in ``d.x``'s order) returns each token's weighted sum.
    One group serves any number of layers, one dispatch/combine pair at a time.

    ``mode``: ``"low_latency"`` (decode: fixed slots per source rank, counts travel with the
    rows in one round of writes) or ``"high_throughput"`` (prefill: counts first, then rows
    packed by expert straight into place; ``capacity`` rows received at most per rank).
    ``slot`` (0..255) separates groups sharing one engine. ``timeout``: how long a phase
    waits for a rank before raising :class:`RankLost`. ``quant="fp8"``: dispatch sends each
    token as e4m3 with one fp32 scale (``amax / 448``), and dispatch returns the rows
    dequantized to ``dtype`` (and the fp8 rows and scales, :class:`Dispatched`); combine
    is unchanged.

    ``combine`` (low-latency only): ``"exact"`` sends every (token, expert) output row back
    and the source sums them in top-k order, equal bit for bit to :func:`reference`;
    ``"reduced"`` sums each token's outputs on the expert's rank first (router weights
    travel with the dispatch metadata) and sends one partial per (token, rank) in
    ``combine_dtype`` (default fp32), summed by the source in rank order: fewer bytes and
    less work on the source, equal bit for bit to ``reference(..., ep=..., num_experts=...)``
    and to the top-k order sum within fp32 rounding. ``None``: ``DEFAULT_COMBINE`` in
    low-latency mode, ``"exact"`` in high-throughput mode.
    """

    def __init__(self) -> None:
        raise TypeError("use `await ExpertParallel.create(view, ...)`")

    @classmethod
    async def create(
        cls,
        view: View,
        *,
        num_experts: int,
        hidden: int,
        topk: int,
        max_tokens: int,
        dtype: torch.dtype = torch.bfloat16,
        mode: Mode = "low_latency",
        capacity: int | None = None,
        device: str | torch.device = "cpu",
        slot: int = 0,
        timeout: float = 10.0,
        quant: Quant | None = None,
        combine: Combine | None = None,
        combine_dtype: torch.dtype | None = None,
    ) -> ExpertParallel:
        self = object.__new__(cls)
        self._init(view, num_experts, hidden, topk, max_tokens, dtype, mode, capacity, device,
                   slot, timeout, quant, combine, combine_dtype)  # fmt: skip
        try:
            await self._connect()
        except BaseException:
            self._close_regions()
            raise
        return self

    # ------------------------------------------------------------ set-up

    def _init(
        self,
        view: View,
        num_experts: int,
        hidden: int,
        topk: int,
        max_tokens: int,
        dtype: torch.dtype,
        mode: Mode,
        capacity: int | None,
        device: str | torch.device,
        slot: int,
        timeout: float,
        quant: Quant | None = None,
        combine: Combine | None = None,
        combine_dtype: torch.dtype | None = None,
    ) -> None:
        W = view.size
        for name, v, lo in (("num_experts", num_experts, 1), ("hidden", hidden, 1),
                            ("topk", topk, 1), ("max_tokens", max_tokens, 1)):  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise MoEInputError(f"{name} must be an int >= {lo}, got {v!r}")
        if num_experts % W:
            raise MoEInputError(
                f"num_experts={num_experts} does not split evenly over {W} ranks; pick a "
                "multiple of the group size"
            )
        if topk > num_experts:
            raise MoEInputError(f"topk={topk} is more than num_experts={num_experts}")
        if dtype not in DTYPES.values():
            raise MoEInputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
        if mode not in MODES:
            raise MoEInputError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < 256:
            raise MoEInputError(f"slot must be an int in 0..255, got {slot!r}")
        if not timeout > 0:
            raise MoEInputError(f"timeout must be > 0 seconds, got {timeout!r}")
        if quant is not None and quant not in QUANTS:
            raise MoEInputError(f"quant must be None or one of {QUANTS}, got {quant!r}")
        if quant == "fp8" and fp8.E4M3 is None:
            raise MoEInputError(
                f"quant='fp8' needs torch.float8_e4m3fn (torch >= 2.1); this is torch "
                f"{torch.__version__}: upgrade torch or pass quant=None"
            )
        if combine is None:
            combine = DEFAULT_COMBINE if mode == "low_latency" else "exact"
        if combine not in COMBINES:
            raise MoEInputError(f"combine must be None or one of {COMBINES}, got {combine!r}")
        if combine == "reduced" and mode != "low_latency":
            raise MoEInputError(
                "combine='reduced' needs mode='low_latency' (its dispatch carries the token "
                "ids and router weights the expert side sums with); pass combine='exact'"
            )
        if combine_dtype is not None and combine != "reduced":
            raise MoEInputError("combine_dtype applies to combine='reduced' only")
        pdt = torch.float32 if combine_dtype is None else combine_dtype
        if pdt not in DTYPES.values():
            raise MoEInputError(f"combine_dtype must be one of {sorted(DTYPES)}, got {pdt}")
        self.combine_mode: Combine = combine
        self.combine_dtype = pdt
        self.quant = quant
        self.view, self.rank, self.size = view, view.rank, W
        self.engine = view.engine
        self.num_experts, self.hidden, self.topk, self.max_tokens = (
            num_experts, hidden, topk, max_tokens)  # fmt: skip
        self.local_experts = num_experts // W
        self.dtype, self.mode, self.timeout = dtype, mode, float(timeout)
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:  # tensors report their index: compare equal
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.slot = slot
        # Distinct experts per token: at most min(topk, El) rows per token to one rank.
        self.slot_rows = max_tokens * min(topk, self.local_experts)
        worst = W * self.slot_rows
        if mode == "low_latency":
            if capacity is not None:
                raise MoEInputError("capacity applies to high_throughput mode only")
            self.capacity = worst
        else:
            cap = worst if capacity is None else capacity
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise MoEInputError(f"capacity must be an int >= 1 (rows), got {capacity!r}")
            self.capacity = min(cap, worst)
        self.row_bytes = hidden * torch.empty((), dtype=dtype).element_size()
        #: Bytes of one dispatched row on the wire: ``row_bytes``, or with fp8 the e4m3 row
        #: padded to 4 bytes plus its fp32 scale.
        self.dispatch_row_bytes = fp8.row_bytes(hidden) if quant else self.row_bytes
        self._regions: list[af.Region] = []
        self._broken: str | None = None
        #: Seconds the last dispatch or combine spent posting its writes and waiting for
        #: arrivals; the rest of its time was routing and packing (torch ops).
        self.last_exchange_s = 0.0
        self._pending: tuple[Route, RecvLayout, torch.Tensor, int, _Partials | None] | None = None
        dev, dt = self.device, dtype
        # Dispatch's wire rows: the group's dtype, or (fp8) bytes: e4m3 row, pad, scale.
        wdt, wh = (torch.uint8, self.dispatch_row_bytes) if quant else (dt, hidden)
        ll = mode == "low_latency"
        # Low-latency: the arena holds one row per (source, token), row s * max_tokens + t;
        # a source writes its own tokens into its own slot there and sends them from it.
        self._send = _buffer((0 if ll else max_tokens * topk, wh), wdt, dev)
        self._arena = _buffer((W * max_tokens if ll else self.capacity, wh), wdt, dev)
        self._quant = (
            torch.empty(max_tokens, wh, dtype=wdt, device=dev) if quant and not ll else None
        )  # fmt: skip
        # Low-latency fp8: the arrived tokens, dequantized once each before the expansion.
        self._deq = (
            torch.empty(W * max_tokens, hidden, dtype=dt, device=dev) if quant and ll else None
        )  # fmt: skip
        self._qscratch = (
            torch.empty(min(max_tokens, fp8.block_rows(hidden)), hidden, dtype=torch.float32,
                        device=dev) if quant else None
        )  # fmt: skip
        red = combine == "reduced"
        # Combine, exact: one row per (token, expert); reduced: one partial per (token, rank),
        # partials for source s at rows s * max_tokens.. of back-send, those from rank d at
        # rows d * max_tokens.. of back.
        self._back_send = _buffer((W * max_tokens if red else self.capacity, hidden),
                                  pdt if red else dt, dev)  # fmt: skip
        self._back = _buffer((W * max_tokens if red else max_tokens * topk, hidden),
                             pdt if red else dt, dev)  # fmt: skip
        # fp32 scratch for the partials, a block of rows at a time (about 2 MiB each)
        blk = max(1, min(W * max_tokens, _RED_BLOCK_BYTES // (4 * hidden))) if red else 0
        self._red_tmp = torch.empty(blk, hidden, dtype=torch.float32, device=dev)
        self._red_acc = torch.empty(blk if pdt != torch.float32 else 0, hidden,
                                    dtype=torch.float32, device=dev)  # fmt: skip
        self._red_rows = torch.empty(blk, hidden, dtype=dt, device=dev)
        self._recv = (
            torch.empty(self.capacity, hidden, dtype=dt, device=dev)
            if mode == "low_latency" or quant else None
        )  # fmt: skip
        # Counts always live in host memory: the receiver reads them on the CPU.
        # Low-latency: per destination, its El counts, where its rows start in the send order,
        # then the flat (token * topk + j) index of each row, sorted by expert then token;
        # high-throughput: the E counts.
        El = self.local_experts
        # combine="reduced": then the router weight of each row, fp32, two to an int64
        self._w_col = El + 1 + self.slot_rows
        self._meta_cols = (self._w_col + (-(-self.slot_rows // 2) if red else 0)
                           if ll else num_experts)  # fmt: skip
        self._meta_send = torch.zeros(W if ll else 1, self._meta_cols, dtype=torch.int64)
        self._meta = torch.zeros(W, self._meta_cols, dtype=torch.int64)

    def _imm(self, phase: int, src: int) -> int:
        return _NIBBLE | self.slot << 20 | phase << 16 | src

    def _register(self, t: torch.Tensor) -> af.Region:
        r = self.engine.register(t)
        self._regions.append(r)
        return r

    async def _connect(self) -> None:
        self._r_send = self._register(self._send) if self._send.numel() else None
        self._r_arena = self._register(self._arena)
        self._r_back_send = self._register(self._back_send)
        self._r_back = self._register(self._back)
        self._r_meta_send = self._register(self._meta_send)
        self._r_meta = self._register(self._meta)
        conf = {"num_experts": self.num_experts, "hidden": self.hidden, "topk": self.topk,
                "max_tokens": self.max_tokens, "dtype": str(self.dtype), "mode": self.mode,
                "capacity": self.capacity, "slot": self.slot, "quant": self.quant,
                "combine": self.combine_mode, "combine_dtype": str(self.combine_dtype)}  # fmt: skip
        descs = [self._r_arena.descriptor(), self._r_back.descriptor(), self._r_meta.descriptor()]
        blob = json.dumps(conf).encode()
        msg = (
            len(blob).to_bytes(4, "little")
            + blob
            + b"".join(len(b := bytes(d)).to_bytes(4, "little") + b for d in descs)
        )
        got = await self.view.allgather(msg, timeout=self.timeout)
        self._arena_d: list[af.Descriptor] = []
        self._back_d: list[af.Descriptor] = []
        self._meta_d: list[af.Descriptor] = []
        differ = []
        for r, m in enumerate(got):
            parts, pos = [], 0
            while pos < len(m):
                n = int.from_bytes(m[pos : pos + 4], "little")
                parts.append(m[pos + 4 : pos + 4 + n])
                pos += 4 + n
            if json.loads(parts[0]) != conf:
                differ.append((r, json.loads(parts[0])))
            arena, back, meta = (af.Descriptor.from_bytes(p) for p in parts[1:4])
            self._arena_d.append(arena)
            self._back_d.append(back)
            self._meta_d.append(meta)
        if differ:
            raise MoEInputError(
                f"rank {self.rank} was created with {conf}, but "
                + "; ".join(f"rank {r} with {c}" for r, c in differ)
                + ": every rank must pass the same arguments to ExpertParallel.create"
            )

    async def aclose(self) -> None:
        """Unregister every buffer (the engine stays open)."""
        self._close_regions()
        self._broken = "the group was closed"

    def _close_regions(self) -> None:
        for r in self._regions:
            r.close()
        self._regions.clear()

    # ------------------------------------------------------------ checks

    def _check_state(self, want_pending: bool, what: str) -> None:
        if self._broken:
            raise MoEError(f"{what}: this group can no longer be used ({self._broken}); "
                           "create a new ExpertParallel")  # fmt: skip
        if want_pending and self._pending is None:
            raise MoEError(f"{what}: no dispatch is waiting for its combine; call dispatch first")
        if not want_pending and self._pending is not None:
            raise MoEError(f"{what}: the last dispatch has not been combined; call combine first")

    def _check_tensor(self, name: str, t: Any, shape: Sequence[int]) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise MoEInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise MoEInputError(
                f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} (hidden, topk and "
                "max_tokens were fixed when the group was created)"
            )
        if t.device != self.device:
            raise MoEInputError(f"{name} is on {t.device}; this group's buffers are on "
                                f"{self.device}")  # fmt: skip
        return t

    def _check_dispatch(self, x: Any, idx: Any, w: Any) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise MoEInputError(
                f"x must be a [tokens, hidden] tensor, got {getattr(x, 'shape', x)!r}"
            )
        T = x.shape[0]
        if self.max_tokens < T:
            raise MoEInputError(
                f"x has {T} tokens, more than max_tokens={self.max_tokens}; split the batch or "
                "create the group with a larger max_tokens"
            )
        self._check_tensor("x", x, (T, self.hidden))
        if x.dtype != self.dtype:
            raise MoEInputError(f"x is {x.dtype}; this group carries {self.dtype}")
        self._check_tensor("topk_idx", idx, (T, self.topk))
        self._check_tensor("topk_weights", w, (T, self.topk))
        if idx.dtype not in (torch.int64, torch.int32, torch.int16):
            raise MoEInputError(f"topk_idx must be an integer tensor, got {idx.dtype}")
        if not w.is_floating_point():
            raise MoEInputError(f"topk_weights must be floating point, got {w.dtype}")
        if T:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.num_experts:
                bad = lo if lo < 0 else hi
                raise MoEInputError(
                    f"topk_idx holds expert id {bad}, outside 0..{self.num_experts - 1}"
                )
            if self.topk > 1 and bool((idx.sort(1).values.diff(dim=1) == 0).any()):
                raise MoEInputError("topk_idx names the same expert twice for one token; "
                                    "each token's top-k experts must be distinct")  # fmt: skip

    # ------------------------------------------------------------ waiting

    def _left(self, deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    async def _post(self, batch: af.Batch, dests: Sequence[int], what: str) -> None:
        if not len(batch):
            return
        t0 = time.perf_counter()
        try:
            await self.engine.write_many(batch, timeout=self.timeout)
        except af.BatchError as e:
            ranks = tuple(sorted({int(dests[i]) for i in e.failures}))
            self._broken = f"{what} failed"
            raise RankLost(f"{what}: writes to rank(s) {list(ranks)} failed ({e}); the group "
                           "is broken, rebuild it from the live ranks", ranks) from e  # fmt: skip
        except af.TransferError as e:
            self._broken = f"{what} failed"
            raise RankLost(f"{what}: a write failed ({e}); rebuild the group from the live "
                           "ranks", tuple(sorted({int(d) for d in dests}))) from e  # fmt: skip
        finally:
            self.last_exchange_s += time.perf_counter() - t0

    async def _await_all(self, phase: int, owed: Sequence[int], deadline: float, what: str) -> None:
        """Wait for ``owed[s]`` immediates of ``phase`` from each source ``s``."""
        t0 = time.perf_counter()
        try:
            await self._await_each(phase, owed, deadline, what)
        finally:
            self.last_exchange_s += time.perf_counter() - t0

    async def _await_each(
        self, phase: int, owed: Sequence[int], deadline: float, what: str
    ) -> None:
        eng = self.engine
        for s, n in enumerate(owed):
            if not n:
                continue
            c = eng.counter(self._imm(phase, s))
            try:
                await c.wait(n, timeout=self._left(deadline))
            except af.ImmTimeout:
                # Sources before s were consumed already; later ones may be short too.
                late = [s] + [r for r in range(s + 1, len(owed))
                              if owed[r] and eng.counter(self._imm(phase, r)).count < owed[r]]  # fmt: skip
                self._broken = f"{what} timed out"
                raise RankLost(
                    f"{what}: rank(s) {late} did not deliver within {self.timeout} s (dead, or "
                    "not calling the same dispatch/combine); rebuild the group from the live ranks",
                    tuple(late),
                ) from None

    async def _guarded(self, aw: Awaitable[T], what: str) -> T:
        """``aw`` under the view's guard (one per call: a guard costs a task), so a member
        that leaves fails the call at once, as :class:`RankLost`."""
        try:
            return await self.view.guard(aw)
        except af.MemberLost as e:
            raise self._member_lost(e, what) from e

    def _member_lost(self, e: af.MemberLost, what: str) -> RankLost:
        names = list(getattr(self.view, "names", ()))
        ranks = (names.index(e.name),) if e.name in names else ()
        self._broken = f"{what}: member {e.name!r} left"
        return RankLost(f"{what}: rank(s) {list(ranks)} (member {e.name!r}) left the group "
                        "view; rebuild the group from a new view", ranks)  # fmt: skip

    def _owed(self, rows: Sequence[int], region: af.Region, rb: int) -> list[int]:
        return [region.expected_imms(n * rb) if n else 0 for n in rows]

    # ------------------------------------------------------------ dispatch

    async def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
    ) -> Dispatched:
        """Send each token's row to the ranks holding its ``topk_idx`` experts.

        ``x``: [T, hidden] with T <= max_tokens; ``topk_idx``: [T, topk] distinct expert ids
        per token; ``topk_weights``: [T, topk], used by :meth:`combine`. Every input is
        checked before anything is sent (:class:`MoEInputError`)."""
        self._check_state(False, "dispatch")
        self._check_dispatch(x, topk_idx, topk_weights)
        self.last_exchange_s = 0.0
        return await self._guarded(self._dispatch(x, topk_idx, topk_weights), "dispatch")

    async def _dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
    ) -> Dispatched:
        deadline = time.monotonic() + self.timeout
        W, rank, rb = self.size, self.rank, self.dispatch_row_bytes
        rt = route(topk_idx, self.num_experts, W)
        if self.mode == "low_latency":
            return await self._dispatch_ll(x, rt, topk_weights, deadline)
        if self._quant is not None:
            # each token once, whatever its top-k: its rows are gathered from here
            src = self._quant[: x.shape[0]]
            fp8.quantize_rows(x, src, self._qscratch)
        else:
            src = x
        n = rt.order.numel()
        self._meta_send[0].copy_(rt.counts)
        if n:
            torch.index_select(src, 0, rt.tokens, out=self._send[:n])
        b = af.Batch()
        for d in range(W):
            meta = self._meta_d[d][rank * self.num_experts * 8 : (rank + 1) * self.num_experts * 8]
            b.add(self._r_meta_send, meta, imm=self._imm(_META, rank))
        await self._post(b, list(range(W)), "dispatch (counts)")
        await self._await_all(_META, [1] * W, deadline, "dispatch (counts)")
        C = self._meta.clone()
        totals = C.view(W, W, -1).sum(dim=(0, 2))  # rows each rank receives
        if int(totals.max()) > self.capacity:
            d = int(totals.argmax())
            self._broken = "a rank's capacity was exceeded"
            raise MoEError(
                f"dispatch: rank {d} would receive {int(totals[d])} rows, more than "
                f"capacity={self.capacity}; create the group with a larger capacity (every "
                "rank raises this, nothing was sent)"
            )
        b = af.Batch()
        dests = []
        for d in range(W):
            if not rt.dest_rows[d]:
                continue
            starts, lengths = packed_targets(C, rank, d)
            keep = lengths > 0
            s, ln = starts[keep].numpy(), lengths[keep].numpy()
            assert self._r_send is not None
            b.add_many(self._r_send, self._arena_d[d], s[:, 0] * rb, s[:, 1] * rb, ln * rb,
                       imm=self._imm(_DATA, rank))  # fmt: skip
            dests.extend([d] * len(ln))
        await self._post(b, dests, "dispatch (rows)")
        lay = recv_layout(C, rank, None)
        await self._await_all(_DATA, self._owed_packed(C), deadline, "dispatch (rows)")
        if self._quant is not None:
            assert self._recv is not None
            wire, out = self._arena[: lay.rows], self._recv[: lay.rows]
        else:
            out = self._arena[: lay.rows]
        self._pending = (rt, lay, topk_weights, x.shape[0], None)
        El = self.local_experts
        experts = range(rank * El, (rank + 1) * El)
        if self._quant is not None:
            q, scales = fp8.dequantize_rows(wire, self.hidden, out)
            return Dispatched(out, lay.expert_counts, experts, q, scales)
        return Dispatched(out, lay.expert_counts, experts)

    async def _dispatch_ll(
        self, x: torch.Tensor, rt: Route, weights: torch.Tensor, deadline: float
    ) -> Dispatched:
        """Low-latency: each token travels once per destination rank (not once per expert),
        straight from this rank's own arena slot, where it was copied (or quantized) first;
        the receiver expands the rows into expert-major order with one gather."""
        W, rank, rb, k = self.size, self.rank, self.dispatch_row_bytes, self.topk
        mt, El, cols = self.max_tokens, self.local_experts, self._meta_cols
        T = x.shape[0]
        at = rank * mt
        own = self._arena[at : at + T]
        if self.quant is not None:
            fp8.quantize_rows(x, own, self._qscratch)
        else:
            own.copy_(x)
        ms = self._meta_send.numpy()
        ms[:, :El] = rt.counts.view(W, El).numpy()
        order = rt.order.cpu().numpy()
        red = self.combine_mode == "reduced"
        if red:  # router weights travel with the metadata: fp32 per row, in send order
            wsend = self._meta_send[:, self._w_col :].view(torch.float32).numpy()
            wflat = weights.detach().reshape(-1).float().cpu().numpy()
        b = af.Batch()
        dests: list[int] = []
        mb = cols * 8
        for d in range(W):
            o, n = rt.dest_off[d], rt.dest_rows[d]
            ms[d, El] = o
            ms[d, El + 1 : El + 1 + n] = order[o : o + n]
            if red:
                wsend[d, :n] = wflat[order[o : o + n]]
            if d == rank:
                continue
            b.add(self._r_meta_send[d * mb : (d + 1) * mb], self._meta_d[d][rank * mb : (rank + 1) * mb],
                  imm=self._imm(_META, rank))  # fmt: skip
            dests.append(d)
            if n:
                starts, lens = token_runs(np.unique(order[o : o + n] // k))
                off = (at + starts) * rb
                b.add_many(self._r_arena, self._arena_d[d], off, off, lens * rb,
                           imm=self._imm(_DATA, rank))  # fmt: skip
                dests.extend([d] * len(lens))
        self._meta[rank].copy_(self._meta_send[rank])
        await self._post(b, dests, "dispatch")
        meta_imms = self._r_meta.expected_imms(mb)
        await self._await_all(_META, self._not_me([meta_imms] * W), deadline, "dispatch (counts)")
        M = self._meta.numpy()
        counts = M[:, :El].copy()
        flats = [M[s, El + 1 : El + 1 + int(counts[s].sum())].copy() for s in range(W)]
        parts = None
        if red:
            Mw = self._meta[:, self._w_col :].view(torch.float32).numpy()
            parts = _Partials(flats, [Mw[s, : flats[s].size].copy() for s in range(W)])
        chunk = self._r_arena.descriptor().chunk_bytes
        owed = [0] * W
        for s in range(W):
            if s != rank and flats[s].size:
                _, lens = token_runs(np.unique(flats[s] // k))
                owed[s] = int(np.maximum(1, -(-(lens * rb) // chunk)).sum())
        lay = ll_layout(counts, flats, M[:, El].tolist(), k, mt)
        await self._await_all(_DATA, owed, deadline, "dispatch (rows)")
        assert self._recv is not None
        out = self._recv[: lay.rows]
        assert lay.em_to_slot is not None
        em = lay.em_to_slot.to(self.device)
        self._pending = (rt, lay, weights, T, parts)
        experts = range(rank * El, (rank + 1) * El)
        if self.quant is not None:
            # Dequantize each arrived token once, then expand (not once per expert row).
            assert self._deq is not None and fp8.E4M3 is not None
            slots, inv = np.unique(lay.em_to_slot.numpy(), return_inverse=True)
            deq = self._deq[: slots.size]
            fp8.dequantize_rows(
                self._arena.index_select(0, torch.from_numpy(slots).to(self.device)),
                self.hidden, deq,
            )  # fmt: skip
            torch.index_select(deq, 0, torch.from_numpy(inv.reshape(-1)).to(self.device), out=out)
            wire = self._arena.index_select(0, em)
            q = wire[:, : self.hidden].view(fp8.E4M3)
            scales = wire[:, -4:].view(torch.float32).view(-1)
            return Dispatched(out, lay.expert_counts, experts, q, scales)
        torch.index_select(self._arena, 0, em, out=out)
        return Dispatched(out, lay.expert_counts, experts)

    def _not_me(self, owed: list[int]) -> list[int]:
        owed[self.rank] = 0
        return owed

    def _owed_packed(self, C: torch.Tensor) -> list[int]:
        """High-throughput: source ``s`` writes one run per local expert it has rows for."""
        El, rank = self.local_experts, self.rank
        Cl = C[:, rank * El : (rank + 1) * El].numpy()
        chunk = self._r_arena.descriptor().chunk_bytes
        nb = Cl * self.dispatch_row_bytes
        per = np.where(Cl > 0, np.maximum(1, -(-nb // chunk)), 0)
        return [int(v) for v in per.sum(1)]

    # ------------------------------------------------------------ combine

    async def combine(self, expert_out: torch.Tensor) -> torch.Tensor:
        """Send each row of ``expert_out`` (in the order :meth:`dispatch` returned) back to
        its token's rank; returns this rank's [T, hidden] sums of its tokens' expert outputs
        weighted by ``topk_weights``, summed over the top-k in order, in fp32."""
        self._check_state(True, "combine")
        assert self._pending is not None
        rt, lay, weights, T, _ = self._pending
        self._check_tensor("expert_out", expert_out, (lay.rows, self.hidden))
        if expert_out.dtype != self.dtype:
            raise MoEInputError(
                f"expert_out is {expert_out.dtype}; this group carries {self.dtype}"
            )
        self.last_exchange_s = 0.0
        return await self._guarded(self._combine(expert_out), "combine")

    async def _combine(self, expert_out: torch.Tensor) -> torch.Tensor:
        assert self._pending is not None
        rt, lay, weights, T, parts = self._pending
        deadline = time.monotonic() + self.timeout
        if parts is not None:
            return await self._combine_reduced(expert_out, rt, lay, T, parts, deadline)
        W, rank, rb = self.size, self.rank, self.row_bytes
        sm_to_em = lay.sm_to_em.to(self.device)
        # Other ranks' rows first (gathered, then posted); this rank's own rows are gathered
        # straight into its back buffer while the writes travel.
        lo = lay.src_off[rank]
        hi = lo + lay.src_rows[rank]
        for a, z in ((0, lo), (hi, lay.rows)):
            if z > a:
                torch.index_select(expert_out, 0, sm_to_em[a:z], out=self._back_send[a:z])
        b = af.Batch()
        dests = []
        for s in range(W):
            rows = lay.src_rows[s]
            if not rows or s == rank:
                continue
            o, at = lay.src_off[s], lay.back_off[s]
            b.add(self._r_back_send[o * rb : (o + rows) * rb],
                  self._back_d[s][at * rb : (at + rows) * rb], imm=self._imm(_BACK, rank))  # fmt: skip
            dests.append(s)
        self._pending = None
        post = asyncio.ensure_future(self._post(b, dests, "combine"))
        await asyncio.sleep(0)  # let it post before the copy below holds the thread
        try:
            if hi > lo:
                at = lay.back_off[rank]
                torch.index_select(expert_out, 0, sm_to_em[lo:hi],
                                   out=self._back[at : at + hi - lo])  # fmt: skip
        finally:
            await post
        owed = self._not_me(self._owed(rt.dest_rows, self._r_back, rb))
        await self._await_all(_BACK, owed, deadline, "combine")
        n = rt.order.numel()
        y = self._back[:n].index_select(0, rt.back.to(self.device))
        return weighted_sum(y.view(T, self.topk, self.hidden), weights)

    async def _combine_reduced(
        self,
        expert_out: torch.Tensor,
        rt: Route,
        lay: RecvLayout,
        T: int,
        parts: _Partials,
        deadline: float,
    ) -> torch.Tensor:
        """Each source gets one partial per token with experts here (the router-weighted sum
        of those experts' outputs, fp32, in top-k slot order), in one write; it sums the
        partials in rank order (docs/moe.md: "Pre-reduced combine")."""
        W, rank, mt, k, dev = self.size, self.rank, self.max_tokens, self.topk, self.device
        prb = self._back.element_size() * self.hidden
        sm_to_em = lay.sm_to_em.numpy()

        def plan(s: int) -> Reduction:
            o, n = lay.src_off[s], lay.src_rows[s]
            r = reduction(parts.flats[s], parts.weights[s], sm_to_em[o : o + n], k)
            if dev.type == "cpu":
                return r
            return Reduction(r.prefix, r.rows.to(dev), r.weights.to(dev))

        b = af.Batch()
        dests = []
        for s in range(W):
            if s == rank or not lay.src_rows[s]:
                continue
            r = plan(s)
            n = r.prefix[0]
            reduce_rows(expert_out, r, self._back_send[s * mt : s * mt + n], self._red_acc,
                        self._red_tmp, self._red_rows)  # fmt: skip
            b.add(self._r_back_send[s * mt * prb : (s * mt + n) * prb],
                  self._back_d[s][rank * mt * prb : (rank * mt + n) * prb],
                  imm=self._imm(_BACK, rank))  # fmt: skip
            dests.append(s)
        self._pending = None
        post = asyncio.ensure_future(self._post(b, dests, "combine"))
        await asyncio.sleep(0)  # let it post before the work below holds the thread
        try:
            if lay.src_rows[rank]:
                r = plan(rank)
                reduce_rows(expert_out, r, self._back[rank * mt : rank * mt + r.prefix[0]],
                            self._red_acc, self._red_tmp, self._red_rows)  # fmt: skip
        finally:
            await post
        order = rt.order.cpu().numpy()
        toks: list[np.ndarray] = []
        owed = [0] * W
        for d in range(W):
            o, n = rt.dest_off[d], rt.dest_rows[d]
            toks.append(partial_tokens(order[o : o + n], k)[0])
            if d != rank and toks[d].size:
                owed[d] = self._r_back.expected_imms(toks[d].size * prb)
        await self._await_all(_BACK, owed, deadline, "combine")
        acc = torch.zeros(T, self.hidden, dtype=torch.float32, device=dev)
        for d in range(W):  # rank order: the documented summation order
            if toks[d].size:
                part = self._back[d * mt : d * mt + toks[d].size]
                acc.index_add_(0, torch.from_numpy(toks[d]).to(dev), part.float())
        return acc.to(self.dtype)


def reference(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    expert: Any,
    quant: Quant | None = None,
    *,
    ep: int | None = None,
    num_experts: int | None = None,
    placement: Sequence[int] | torch.Tensor | None = None,
    combine_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """What ``combine(expert(dispatch(x)))`` computes, in one process: ``expert(e, rows)``
    maps expert ``e``'s rows to its outputs. ``quant="fp8"``: the experts see each token
    quantized and dequantized as an fp8 dispatch does (:func:`asyncfabric.moe.fp8.roundtrip`).

    By default the top-k order sum of ``combine="exact"``. With ``ep`` ranks (experts split
    evenly in rank order, as :class:`ExpertParallel` places them; needs ``num_experts``) or
    an explicit ``placement`` (expert id -> rank): what ``combine="reduced"`` computes, each
    rank's partial summed in top-k slot order, rounded to ``combine_dtype``, then the
    partials summed in rank order (docs/moe.md, "Pre-reduced combine")."""
    if quant is not None:
        if quant not in QUANTS:
            raise MoEInputError(f"quant must be None or one of {QUANTS}, got {quant!r}")
        x = fp8.roundtrip(x)
    T, k = topk_idx.shape
    y = torch.empty(T, k, x.shape[1], dtype=x.dtype, device=x.device)
    for e in torch.unique(topk_idx).tolist():
        t, j = (topk_idx == e).nonzero(as_tuple=True)
        y[t, j] = expert(e, x[t])
    if ep is None and placement is None:
        return weighted_sum(y, topk_weights)
    if placement is None:
        if num_experts is None or ep is None or ep < 1 or num_experts % ep:
            raise MoEInputError("reference: ep needs num_experts, a multiple of ep")
        place = torch.arange(num_experts) // (num_experts // ep)
    else:
        place = torch.as_tensor(placement, dtype=torch.int64)
    return _reduced_sum(y, topk_idx, topk_weights, place.to(x.device), combine_dtype)


def _reduced_sum(
    y: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, place: torch.Tensor,
    pdt: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """The pre-reduced combine's sum, written apart from its code (same order, plain ops)."""
    T, k, H = y.shape
    w = weights.float()
    rank_of = place[idx.long()]
    acc = torch.zeros(T, H, dtype=torch.float32, device=y.device)
    for d in range(int(place.max()) + 1 if place.numel() else 0):
        part = torch.zeros(T, H, dtype=torch.float32, device=y.device)
        has = torch.zeros(T, dtype=torch.bool, device=y.device)
        for j in range(k):  # ascending top-k slot
            m = rank_of[:, j] == d
            if not bool(m.any()):
                continue
            prod = w[m, j, None] * y[m, j].float()
            part[m] = torch.where(has[m, None], part[m] + prod, prod)
            has |= m
        if bool(has.any()):
            acc[has] = acc[has] + part[has].to(pdt).float()
    return acc.to(y.dtype)
