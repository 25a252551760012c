"""``af.join``: become a member of a group (starting an in-process store if none is named)."""

from __future__ import annotations

import asyncio
import os
import weakref
from typing import Any

import asyncfabric as af

from ..store import Store, StoreServer, connect
from ..store.embedded import connect_embedded
from .group import Group
from .keys import check_name

STORE_URL_ENV = "ASYNCFABRIC_STORE"

# One in-process store per event loop, shared by every af.join(store=None) in it
# (so members of one process find each other), closed when the last of them leaves.
_local: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[Any]] = (
    weakref.WeakKeyDictionary()
)


async def join(
    store: Store | StoreServer | str | None = None,
    *,
    group: str,
    name: str,
    engine: af.Engine,
    meta: dict[str, Any] | None = None,
    ttl: float = 5.0,
    store_grace: float | None = None,
) -> Group:
    """Join ``group`` as ``name``, publishing ``engine``'s address and ``meta`` under a lease.

    ``store``: a connected :class:`~asyncfabric.store.Store`, an in-process
    :class:`~asyncfabric.store.StoreServer`, a URL (``af://host:port``,
    ``etcd://host:2379``), or None: the URL in ``$ASYNCFABRIC_STORE`` if set, else an
    embedded store started in this process (shared by the joins of this event loop).
    ``ttl``: seconds without renewal after which the others see ``Left("expired")``.
    ``store_grace``: how long to keep trying to re-register when the store goes away
    before the group reports :class:`StoreLost` (default ``2 * ttl + 5``)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "groups are asyncio-only: call af.join from a coroutine running under asyncio "
            "(asyncio.run or af.run), not trio or plain threads"
        ) from None
    check_name("group", group)
    check_name("name", name)
    if not isinstance(engine, af.Engine):
        raise TypeError(f"engine must be an open asyncfabric Engine, got {type(engine).__name__}")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict of JSON values, got {type(meta).__name__}")
    import json

    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"meta must hold JSON values only: {exc}") from None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0.5 <= ttl <= 3600:
        raise ValueError(f"ttl must be a number of seconds from 0.5 to 3600, got {ttl!r}")
    grace = 2 * ttl + 5 if store_grace is None else float(store_grace)
    engine.address  # noqa: B018 - raises EngineClosed with its own advice if not open

    cleanup: list[Any] = []
    if store is None and os.environ.get(STORE_URL_ENV):
        store = os.environ[STORE_URL_ENV]
    if store is None:
        loop = asyncio.get_running_loop()
        entry = _local.get(loop)
        if entry is None:
            srv = await af.store.serve("127.0.0.1:0", secret=os.urandom(32).hex())
            entry = _local[loop] = [srv, 0]
        srv = entry[0]
        entry[1] += 1

        async def release() -> None:
            entry[1] -= 1
            if entry[1] == 0 and _local.get(loop) is entry:
                del _local[loop]
                await srv.aclose()

        cleanup.append(release)
        store = srv
    if isinstance(store, StoreServer):
        try:
            st: Store = await connect_embedded(store.host, store.port, store._secret)
        except BaseException:
            for cb in cleanup:
                await cb()
            raise
        cleanup.insert(0, st.aclose)
    elif isinstance(store, str):
        st = await connect(store)
        cleanup.insert(0, st.aclose)
    elif isinstance(store, Store):
        st = store
    else:
        raise TypeError(
            f"store must be a Store, a StoreServer, a URL or None, got {type(store).__name__}"
        )
    g = Group(st, group, name, engine, meta, float(ttl), grace)
    g._on_leave.extend(cleanup)
    try:
        await g._join()
    except BaseException:
        for cb in cleanup:
            await cb()
        raise
    return g
