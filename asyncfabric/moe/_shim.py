"""TEMPORARY stand-in for the groups API (issue 13) until it lands on main.

It offers only what asyncfabric.moe needs from a frozen group view (``rank``, ``size``,
``engine``, ``id``, ``allgather``, ``guard``), built from engine addresses handed out by
the caller. Delete this file and use ``af.join(...)`` / ``g.wait_for(n)`` once groups land.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncfabric as af

T = TypeVar("T")
_HDR = struct.Struct("<IQ")  # sender rank, allgather round


class ShimView:
    """A fixed-rank view over engines whose addresses every rank knows, in rank order."""

    def __init__(self, engine: af.Engine, rank: int, addresses: Sequence[bytes]) -> None:
        self.engine = engine
        self.rank = rank
        self.size = len(addresses)
        self.id = "shim"
        self._addrs = list(addresses)
        self._round = 0
        self._early: dict[tuple[int, int], bytes] = {}

    async def allgather(self, data: bytes, timeout: float | None = None) -> list[bytes]:
        rnd, self._round = self._round, self._round + 1
        for r, a in enumerate(self._addrs):
            if r != self.rank:
                await self.engine.send(a, _HDR.pack(self.rank, rnd) + data, timeout=timeout)
        got: dict[int, bytes] = {self.rank: data}
        for key in [k for k in self._early if k[1] == rnd]:
            got[key[0]] = self._early.pop(key)
        while len(got) < self.size:
            msg = await self.engine.recv(timeout=timeout)
            src, r = _HDR.unpack_from(msg)
            if r == rnd:
                got[src] = msg[_HDR.size :]
            else:
                self._early[(src, r)] = msg[_HDR.size :]
        return [got[r] for r in range(self.size)]

    async def guard(self, aw: Awaitable[T]) -> T:
        return await aw


@asynccontextmanager
async def local_views(n: int, provider: str = "shm", **kw: Any) -> AsyncIterator[list[ShimView]]:
    """``n`` engines in this process, one view each (like asyncfabric.testing.groups)."""
    engines: list[af.Engine] = []
    try:
        for _ in range(n):
            engines.append(await af.Engine.open(provider, **kw))
        addrs = [e.address for e in engines]
        yield [ShimView(e, i, addrs) for i, e in enumerate(engines)]
    finally:
        for e in engines:
            await e.aclose()


def _child(
    rank: int, size: int, conn: Any, provider: str, target: Any, args: tuple[Any, ...]
) -> None:
    import asyncio

    async def main() -> Any:
        async with af.Engine(provider) as eng:
            conn.send(eng.address)
            view = ShimView(eng, rank, conn.recv())
            return await target(view, *args)

    try:
        conn.send(("ok", asyncio.run(main())))
    except BaseException as exc:
        conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def spawn_views(
    size: int, target: Any, args: tuple[Any, ...] = (), *, provider: str = "shm",
    timeout: float = 300.0,
) -> list[tuple[str, Any]]:  # fmt: skip
    """Run ``await target(view, *args)`` in ``size`` processes, one rank each; returns each
    rank's ``("ok", result)`` or ``("error", message)``, or ``("dead", exitcode)`` for a rank
    whose process died. ``target`` must be importable (module-level)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for r in range(size):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_child, args=(r, size, child, provider, target, args))
        p.start()
        child.close()
        pipes.append(parent)
        procs.append(p)
    try:
        addrs = []
        for c in pipes:
            if not c.poll(120):
                raise RuntimeError("a rank did not open its engine within 120 s")
            addrs.append(c.recv())
        for c in pipes:
            c.send(addrs)
        out: list[tuple[str, Any]] = []
        for c, p in zip(pipes, procs):
            try:
                if not c.poll(timeout):
                    raise RuntimeError(f"rank {len(out)} did not finish within {timeout} s")
                out.append(c.recv())
            except EOFError:
                p.join(5)
                out.append(("dead", p.exitcode))
        return out
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
