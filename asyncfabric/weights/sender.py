"""The trainer side: one rank executes its part of the plan, pipelined.

Bound to a set of receivers once (cached until the set changes), an update is:

1. wait, for each receiver, for its acknowledgement that its spare buffer is
   free (a receiver that does not send it within ``timeout`` fails alone);
2. post every *direct* run (contiguous in the trainer's buffer, no cast) as one
   ``write_many`` straight from the trainer's buffer;
3. meanwhile pack (and cast) the *staged* runs into buckets of at most
   ``bucket_bytes``, ``depth`` staging buffers in rotation: packing bucket i+1
   (in a worker thread) overlaps the writes of bucket i, and a bucket waits
   only for the writes that last used its staging buffer. Staging memory is
   ``depth * bucket_bytes``, whatever the model's size.

Runs bound for several receivers of the same layout and rank (replicas) are
packed once and written to each. Every write of update ``v`` carries one
immediate, the data immediate of ``v``: one counter per (version, receiver).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
import torch

import asyncfabric as af

from . import imms
from .endpoints import ReceiverInfo, SenderInfo
from .errors import ReceiverFailed, UpdateError
from .layout import Layout
from .plan import Move, plan

_U64 = np.uint64


@dataclass
class _Target:
    """The runs one (inference layout, rank) receives from this trainer rank."""

    direct: tuple[np.ndarray, np.ndarray, np.ndarray]  # src offsets, dst offsets, nbytes
    staged: list[Move]
    # per bucket: stage offsets, dst offsets, nbytes
    buckets: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)


@dataclass
class _Binding:
    receivers: tuple[ReceiverInfo, ...]
    targets: dict[tuple[str, int], _Target]
    packs: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per bucket: (stage view, src view)


class Sender:
    """Trainer rank ``rank`` of ``layout``, whose shards live in ``buffer``
    (a flat uint8 tensor laid out by ``layout.alloc(rank)``; keep the model's
    parameters as ``layout.views(buffer, rank)`` and updates send them as they
    are at the call).

    ``slot``: the weight-update instance on this engine (0..255); ``cast``: as
    in :func:`plan`; ``bucket_bytes`` and ``depth``: staging buckets (see the
    module's docs)."""

    def __init__(
        self,
        engine: af.Engine,
        layout: Layout,
        rank: int,
        buffer: torch.Tensor,
        *,
        name: str | None = None,
        slot: int = 0,
        cast: bool = False,
        bucket_bytes: int = 32 << 20,
        depth: int = 3,
    ) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1 (staging buffers), got {depth!r}")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 4096:
            raise ValueError(f"bucket_bytes must be an int >= 4096, got {bucket_bytes!r}")
        self.engine = engine
        self.layout = layout
        self.rank = layout._rank(rank)
        self.name = name or f"trainer{rank}"
        self.slot = imms.check_slot(slot)
        self.cast = cast
        self.bucket_bytes = bucket_bytes
        self.depth = depth
        self._views = layout.views(buffer, rank)  # checks the buffer
        self._buf = buffer
        self._region = engine.register(buffer)
        self._ack_buf = torch.zeros(64, dtype=torch.uint8)
        self._ack_region = engine.register(self._ack_buf)
        self._staging: list[torch.Tensor] = []
        self._stage_regions: list[af.Region] = []
        self._binding: _Binding | None = None
        # per receiver name: (buffer it serves, version it last acknowledged or None)
        self._state: dict[str, tuple[int, int | None]] = {}

    @property
    def info(self) -> SenderInfo:
        return SenderInfo(self.name, self.rank, self._ack_region.descriptor())

    @property
    def staging_bytes(self) -> int:
        """Bytes of staging memory this sender holds (``depth * bucket_bytes`` at most)."""
        return sum(t.numel() for t in self._staging)

    # ------------------------------------------------------------ binding

    def _bind(self, receivers: tuple[ReceiverInfo, ...]) -> _Binding:
        b = self._binding
        if b is not None and b.receivers == receivers:
            return b
        names = [r.name for r in receivers]
        if len(set(names)) != len(names):
            raise ValueError(f"receiver names must be unique, got {names}")
        idx = [r.index for r in receivers]
        if len(set(idx)) != len(idx):
            raise ValueError(f"receiver indexes must be unique, got {idx}")
        targets: dict[tuple[str, int], _Target] = {}
        for r in receivers:
            key = (r.layout.key, r.rank)
            if key in targets:
                continue
            moves = [m for m in plan(self.layout, r.layout, cast=self.cast).moves
                     if m.src == self.rank and m.dst == r.rank]  # fmt: skip
            d = [m for m in moves if m.direct]
            so = np.concatenate([m.src_offsets for m in d if m.src_offsets is not None] or
                                [np.zeros(0, _U64)])  # fmt: skip
            do = np.concatenate([m.dst_offsets for m in d] or [np.zeros(0, _U64)])
            nb = np.concatenate([np.full(m.runs, m.run_bytes, _U64) for m in d] or
                                [np.zeros(0, _U64)])  # fmt: skip
            staged = [p for m in moves if not m.direct for p in m.split(self.bucket_bytes)]
            targets[key] = _Target((so, do, nb), staged)
        # staged runs into buckets, in order; a piece larger than a bucket gets one of its own
        packs: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        rows: dict[tuple[int, tuple[str, int]], list[tuple[int, Move]]] = {}
        size = self.bucket_bytes + 1
        biggest = self.bucket_bytes
        for key, t in targets.items():
            for m in t.staged:
                if size + m.nbytes > self.bucket_bytes:
                    packs.append([])
                    size = 0
                k = len(packs) - 1
                rows.setdefault((k, key), []).append((size, m))
                biggest = max(biggest, m.nbytes)
                size += -(-m.nbytes // 64) * 64
        self._ensure_staging(min(self.depth, len(packs)), biggest)
        for (k, key), ms in rows.items():
            st = self._staging[k % self.depth]
            for off, m in ms:
                box = m.box
                view = st[off : off + m.nbytes].view(m.dst_dtype).view(tuple(n for _, n in box))
                src = self._views[m.param]
                if box:
                    src = src[tuple(slice(a, a + n) for a, n in box)]
                packs[k].append((view, src))
            so = np.concatenate([off + np.arange(m.runs, dtype=_U64) * _U64(m.run_bytes)
                                 for off, m in ms]).astype(_U64)  # fmt: skip
            do = np.concatenate([m.dst_offsets for _, m in ms])
            nb = np.concatenate([np.full(m.runs, m.run_bytes, _U64) for _, m in ms])
            targets[key].buckets[k] = (so, do, nb)
        self._binding = _Binding(receivers, targets, packs)
        return self._binding

    def _ensure_staging(self, n: int, nbytes: int) -> None:
        if len(self._staging) >= n and all(t.numel() >= nbytes for t in self._staging):
            return
        for r in self._stage_regions:
            r.close()
        self._staging = [
            torch.empty(nbytes, dtype=torch.uint8, device=self._buf.device) for _ in range(n)
        ]
        self._stage_regions = [self.engine.register(t) for t in self._staging]

    # ------------------------------------------------------------ update

    async def update(
        self,
        version: int,
        receivers: Sequence[ReceiverInfo],
        *,
        timeout: float = 30.0,
        write_timeout: float | None = None,
    ) -> tuple[str, ...]:
        """Send this rank's part of update ``version`` to ``receivers``; returns the
        names of the receivers it reached.

        A receiver that does not free its spare buffer within ``timeout`` seconds,
        or that goes away during the writes, fails alone: the others complete,
        then :class:`UpdateError` names each failure (``failures``) and the
        receivers that did get the update (``completed``). ``write_timeout``
        bounds the writes (default: no bound beyond the engine's ``peer_timeout``,
        which fails the writes to a peer that went away)."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an int >= 0, got {version!r}")
        rxs = tuple(receivers)
        if not rxs:
            return ()
        bind = self._bind(rxs)
        failures: dict[str, BaseException] = {}

        async def acked(r: ReceiverInfo) -> None:
            serving, last = self._state.get(r.name, (0, None))
            c = self.engine.counter(imms.ack(self.slot, r.index, last))
            try:
                await c.wait(1, timeout=timeout)
            except af.ImmTimeout:
                self._state.pop(r.name, None)
                failures[r.name] = ReceiverFailed(
                    f"receiver {r.name} did not free its spare buffer for update {version} "
                    f"within {timeout} s (it still serves version {last}, or is gone); it is "
                    "left out of this update: restart it (Receiver.start) to take updates again"
                )

        async with anyio.create_task_group() as tg:
            for r in rxs:
                tg.start_soon(acked, r)
        live = [r for r in rxs if r.name not in failures]
        imm = imms.data(self.slot, version)

        def batch_for(
            src: af.Region, cols: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]]
        ) -> tuple[af.Batch, list[int], list[str]]:
            b = af.Batch()
            starts: list[int] = []
            owners: list[str] = []
            for r in live:
                c = cols.get((r.layout.key, r.rank))
                if c is None or not c[0].size:
                    continue
                starts.append(len(b))
                owners.append(r.name)
                tgt = 1 - self._state.get(r.name, (0, None))[0]
                b.add_many(src, r.buffers[tgt], c[0], c[1], c[2], imm=imm)
            return b, starts, owners

        async def post(b: af.Batch, starts: list[int], owners: list[str]) -> None:
            try:
                await self.engine.write_many(b, timeout=write_timeout)
            except af.BatchError as exc:
                for i, e in exc.failures.items():
                    failures.setdefault(owners[bisect.bisect_right(starts, i) - 1], e)
            except af.AsyncFabricError as exc:
                for o in owners:
                    failures.setdefault(o, exc)

        done = [anyio.Event() for _ in range(self.depth)]
        for e in done:
            e.set()
        cuda = self._buf.device.type == "cuda"

        async def staged(k: int, ev: anyio.Event) -> None:
            try:
                b, starts, owners = batch_for(
                    self._stage_regions[k % self.depth],
                    {key: t.buckets[k] for key, t in bind.targets.items() if k in t.buckets},
                )
                if len(b):
                    await post(b, starts, owners)
            finally:
                ev.set()

        async with anyio.create_task_group() as tg:
            if live:
                db, ds, do = batch_for(self._region, {k: t.direct for k, t in bind.targets.items()})
                if len(db):
                    tg.start_soon(post, db, ds, do)
                for k, pack in enumerate(bind.packs):
                    slot_ev = done[k % self.depth]
                    await slot_ev.wait()
                    await anyio.to_thread.run_sync(_pack, pack, cuda)
                    ev = done[k % self.depth] = anyio.Event()
                    tg.start_soon(staged, k, ev)
        completed = []
        for r in rxs:
            if r.name in failures:
                self._state.pop(r.name, None)
            else:
                serving = self._state.get(r.name, (0, None))[0]
                self._state[r.name] = (1 - serving, version)
                completed.append(r.name)
        if failures:
            shown = "; ".join(f"{n}: {e}" for n, e in list(failures.items())[:3])
            raise UpdateError(
                f"update {version} from {self.name} failed for {len(failures)} of {len(rxs)} "
                f"receivers (the others have it): {shown}",
                failures,
                tuple(completed),
            )
        return tuple(completed)

    def close(self) -> None:
        for r in (self._region, self._ack_region, *self._stage_regions):
            r.close()


def _pack(pack: list[tuple[torch.Tensor, torch.Tensor]], cuda: bool) -> None:
    for dst, src in pack:
        dst.copy_(src)
    if cuda:
        torch.cuda.synchronize(pack[0][0].device)


