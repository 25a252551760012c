"""Ranks as processes on this machine, joined through a real group (for tests, examples and
benchmarks of the systems built on groups).

``spawn_views(4, target, args)`` starts an embedded store in this process, then four
processes; each opens an engine, ``af.join``s the group, takes ``g.wait_for(4)`` and returns
``await target(view, *args)``. ``target`` must be importable (module level), since the
processes are spawned.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import asyncfabric as af


def _child(rank: int, size: int, conn: Any, store: tuple[str, str], group: str,
           provider: str, ttl: float, target: Any, args: tuple[Any, ...]) -> None:  # fmt: skip
    async def main() -> Any:
        node = "127.0.0.1" if provider == "tcp" else None  # tests stay on this machine
        async with af.Engine(provider, node=node) as eng:
            st = await af.store.connect(store[0], secret=store[1])
            try:
                g = await af.join(st, group=group, name=f"r{rank:04d}", engine=eng, ttl=ttl)
                try:
                    view = await g.wait_for(size, timeout=120)
                    return await target(view, *args)
                finally:
                    await g.leave()
            finally:
                await st.aclose()

    try:
        conn.send(("ok", asyncio.run(main())))
    except BaseException as exc:
        conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class _Store:
    """An embedded store served from a thread of this (synchronous) process."""

    def __init__(self) -> None:
        self.secret = os.urandom(16).hex()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True, name="af-ranks-store")
        self._t.start()
        if not self._ready.wait(30):
            raise RuntimeError("the embedded store did not start within 30 s")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self.server = self._loop.run_until_complete(
            af.store.serve("127.0.0.1:0", secret=self.secret)
        )
        self.url = self.server.url
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.server.aclose(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._t.join(10)


def spawn_views(
    size: int,
    target: Any,
    args: tuple[Any, ...] = (),
    *,
    provider: str = "shm",
    ttl: float = 2.0,
    timeout: float = 300.0,
) -> list[tuple[str, Any]]:
    """Each rank's ``("ok", result)`` or ``("error", message)``, or ``("dead", exitcode)``
    for a rank whose process died."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    store = _Store()
    group = f"ranks-{os.urandom(4).hex()}"
    pipes, procs = [], []
    try:
        for r in range(size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_child, args=(r, size, child, (store.url, store.secret),
                                                 group, provider, ttl, target, args))  # fmt: skip
            p.start()
            child.close()
            pipes.append(parent)
            procs.append(p)
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
        store.close()
