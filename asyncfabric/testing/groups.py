"""Real groups for system tests: an embedded store and ``n`` engines in this process.

``async with local_views(4, provider="shm") as views:`` gives one
:class:`~asyncfabric.View` per engine, ordered by rank. Nothing is mocked: the
store is the embedded server on loopback and the engines are real.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import asyncfabric as af


@asynccontextmanager
async def local_views(
    n: int,
    provider: str = "shm",
    *,
    group: str | None = None,
    ttl: float = 10.0,
    store: Any = None,
    timeout: float = 60.0,
    **engine_kwargs: Any,
) -> AsyncIterator[list[af.View]]:
    """``n`` engines on ``provider``, each joined to one fresh group, and their views.

    ``store``: a store URL or :class:`~asyncfabric.store.Store` to use instead of a
    fresh embedded store (etcd, say)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    name = group or f"local-{os.urandom(4).hex()}"
    async with AsyncExitStack() as stack:
        if store is None:
            srv = await af.store.serve("127.0.0.1:0", secret=os.urandom(16).hex())
            stack.push_async_callback(srv.aclose)
            store = srv
        if provider == "tcp":
            engine_kwargs.setdefault("node", "127.0.0.1")  # tests stay on this machine
        engines = []
        for _ in range(n):
            eng = await af.Engine.open(provider, **engine_kwargs)
            stack.push_async_callback(eng.aclose)
            engines.append(eng)
        groups = []
        for i, eng in enumerate(engines):
            g = await af.join(store, group=name, name=f"r{i:04d}", engine=eng, ttl=ttl)
            stack.push_async_callback(g.leave)
            groups.append(g)
        views = await asyncio.gather(*(g.wait_for(n, timeout=timeout) for g in groups))
        yield sorted(views, key=lambda v: v.rank)
