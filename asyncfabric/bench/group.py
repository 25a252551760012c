"""``asyncfabric bench group``: how fast groups form and answer, per store.

For each store (the embedded one, started in this process; etcd at ``--etcd URL``,
else one started here when the ``etcd`` binary is installed), ``--members``
engines join one group at once, each over its own store connection, and we time
until every one of them sees them all (``join_all_s``), with each ``af.join``
call's own latency (``join_p50_ms``). Then one member looks up another's named
descriptor ``--lookups`` times (``lookup_p50_us``/``p99``), beside the store's own
``get`` of the same key through a bare client (``store_get_p50_us``): the
baseline a hand-written rendezvous on that store pays, so the difference is what
the group layer costs.

    asyncfabric bench group --members 64 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import asyncfabric as af


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _one(store: Any, url_for_clients: str, secret: str | None, a: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    kw: dict[str, Any] = {"node": a.node or "127.0.0.1"} if a.provider == "tcp" else {}
    engines = [await af.Engine.open(a.provider, **kw) for _ in range(a.members)]
    clients = [await af.store.connect(url_for_clients, secret=secret) for _ in range(a.members)]
    group = f"bench-{os.urandom(4).hex()}"
    lat: list[float] = []

    async def join(i: int) -> af.Group:
        t = time.perf_counter()
        g = await af.join(clients[i], group=group, name=f"m{i:03d}", engine=engines[i], ttl=10)
        lat.append(time.perf_counter() - t)
        return g

    groups: list[af.Group] = []
    try:
        t0 = time.perf_counter()
        groups = list(await asyncio.gather(*(join(i) for i in range(a.members))))
        while any(len(g.members) < a.members for g in groups):
            await asyncio.sleep(0.001)
        join_all = time.perf_counter() - t0
        region = engines[1].register(bytearray(4096))
        await groups[1].publish("bench/buf", region.descriptor())
        look: list[float] = []
        for _ in range(a.lookups):
            t = time.perf_counter()
            await groups[0].lookup(groups[1].name, "bench/buf", timeout=10)
            look.append(time.perf_counter() - t)
        key = f"asyncfabric/groups/{group}/p/{groups[1].name}/bench/buf"
        raw: list[float] = []
        for _ in range(a.lookups):
            t = time.perf_counter()
            await clients[2].get(key)
            raw.append(time.perf_counter() - t)
        return {
            "members": a.members,
            "provider": a.provider,
            "join_all_s": join_all,
            "join_p50_ms": statistics.median(lat) * 1e3,
            "lookup_p50_us": statistics.median(look) * 1e6,
            "lookup_p99_us": _pct(look, 0.99) * 1e6,
            "store_get_p50_us": statistics.median(raw) * 1e6,
        }
    finally:
        for g in groups:
            await g.leave()
        for c in clients:
            await c.aclose()
        for e in engines:
            e.close()


@contextlib.contextmanager
def _etcd(url: str | None) -> Iterator[str | None]:
    if url:
        yield url
        return
    try:
        import aetcd  # noqa: F401

        from ..testing.etcd import EtcdUnavailable, start_etcd
    except ImportError:
        print("bench group: etcd skipped: pip install 'asyncfabric[etcd]'", file=sys.stderr)
        yield None
        return
    try:
        with start_etcd() as u:
            yield u
    except EtcdUnavailable as exc:
        print(f"bench group: etcd skipped: {exc}", file=sys.stderr)
        yield None


async def _run(a: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    if "embedded" in a.stores:
        secret = os.urandom(16).hex()
        srv = await af.store.serve("127.0.0.1:0", secret=secret)
        try:
            rows.append({"store": "embedded", **await _one(srv, srv.url, secret, a)})
        finally:
            await srv.aclose()
    if "etcd" in a.stores:
        with _etcd(a.etcd) as url:
            if url:
                rows.append({"store": "etcd", **await _one(url, url, None, a)})
    return rows


def main(argv: list[str]) -> int:
    from .._cli import CliParser

    p = CliParser(prog="asyncfabric bench group", description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=64)
    p.add_argument("--lookups", type=int, default=1000)
    p.add_argument("--provider", default="shm")
    p.add_argument("--node", help="local address for tcp engines (default 127.0.0.1)")
    p.add_argument("--stores", default="embedded,etcd", type=lambda s: s.split(","))
    p.add_argument("--etcd", help="etcd://HOST:PORT to use (default: start one if installed)")
    p.add_argument("--json", help="write the rows to this JSON file")
    a = p.parse_args(argv)
    if a.members < 2 or a.lookups < 1:
        p.error("--members must be >= 2 and --lookups >= 1")
    rows = asyncio.run(_run(a))
    cols = ["store", "members", "join_all_s", "join_p50_ms", "lookup_p50_us", "lookup_p99_us",
            "store_get_p50_us"]  # fmt: skip
    print("  ".join(f"{c:>16}" for c in cols))
    for r in rows:
        print(
            "  ".join(f"{r[c]:>16.4g}" if isinstance(r[c], float) else f"{r[c]:>16}" for c in cols)
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
