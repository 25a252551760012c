"""TEMPORARY shim for group views (issue 13), to be deleted when groups land.

It offers the part of ``af.View`` (docs: /work/notes/group-api.md) that the
collectives use: ``rank``, ``size``, ``names``, ``engine``, ``id``,
``allgather`` and ``guard``, over engines whose addresses are already known
(in one process) or handed over through files (across processes). Control
messages carry the allgather. Nothing outside tests and the benchmark uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import asyncfabric as af

T = TypeVar("T")
_HDR = struct.Struct("<16sII")  # view id (16 bytes), sequence, sender rank


class ShimView:
    """A frozen, ordered view of ``size`` engines; this one is ``rank``."""

    def __init__(self, engine: af.Engine, rank: int, addresses: list[bytes], vid: str) -> None:
        self.engine = engine
        self.rank = rank
        self.size = len(addresses)
        self.names = tuple(f"r{i}" for i in range(self.size))
        self.id = vid
        self._peers = [engine.connect(a) for a in addresses]
        self._seq = 0
        self._stash: dict[tuple[int, int], bytes] = {}

    def peer(self, rank: int) -> af.Peer:
        return self._peers[rank]

    async def guard(self, aw: Awaitable[T]) -> T:
        return await aw

    async def allgather(self, data: bytes, timeout: float | None = None) -> list[bytes]:
        self._seq += 1
        seq = self._seq
        head = _HDR.pack(uuid.UUID(self.id).bytes, seq, self.rank)
        for r in range(self.size):
            if r != self.rank:
                await self.engine.send(self._peers[r], head + data, timeout=timeout)
        out: list[bytes | None] = [None] * self.size
        out[self.rank] = data
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(o is None for o in out):
            for r in range(self.size):
                if out[r] is None and (seq, r) in self._stash:
                    out[r] = self._stash.pop((seq, r))
            if all(o is not None for o in out):
                break
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            msg = await self.engine.recv(timeout=left)
            vid, s, r = _HDR.unpack_from(msg)
            if vid == uuid.UUID(self.id).bytes:
                self._stash[(s, r)] = msg[_HDR.size :]
        return [o for o in out if o is not None]

    async def barrier(self, timeout: float | None = None) -> None:
        await self.allgather(b"", timeout)


@contextlib.asynccontextmanager
async def local_shim_views(
    n: int, provider: str = "shm", **engine_kw: Any
) -> AsyncIterator[list[ShimView]]:
    """``n`` engines in this process, one view each (like testing.groups.local_views)."""
    async with contextlib.AsyncExitStack() as stack:
        engines = [
            await stack.enter_async_context(af.Engine(provider, **engine_kw)) for _ in range(n)
        ]
        vid = str(uuid.uuid4())
        addrs = [e.address for e in engines]
        yield [ShimView(e, i, addrs, vid) for i, e in enumerate(engines)]


async def file_shim_view(
    engine: af.Engine,
    directory: str | os.PathLike[str],
    rank: int,
    size: int,
    timeout: float = 60.0,
) -> ShimView:
    """A view across processes: each writes its address to ``directory`` and reads the others'."""
    d = Path(directory)
    tmp = d / f".{rank}.tmp"
    tmp.write_bytes(engine.address)
    tmp.rename(d / f"{rank}.addr")
    if rank == 0:
        (d / ".id.tmp").write_text(str(uuid.uuid4()))
        (d / ".id.tmp").rename(d / "id")
    deadline = time.monotonic() + timeout
    while True:
        files = [d / f"{r}.addr" for r in range(size)]
        if all(f.exists() for f in files) and (d / "id").exists():
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every rank of {size} wrote its address to {d}")
        await asyncio.sleep(0.01)
    return ShimView(engine, rank, [f.read_bytes() for f in files], (d / "id").read_text())
