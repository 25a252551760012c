"""Soak: 1,000,000 small writes with immediates from 8 peer processes into one engine,
counted with counter waits: counts exact (none lost, none duplicated), and memory and
registrations back to baseline after close."""

from __future__ import annotations

import gc
import time

import anyio
import numpy as np
import pytest

import asyncfabric as af
from asyncfabric.backends.libfabric import LibfabricBackend
from asyncfabric.testing.peer import PeerProcess

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PEERS = 8
TOTAL = 1_000_000
PER_PEER = TOTAL // PEERS
WAIT_STEP = 5_000  # the receiver waits in steps: many satisfied waits, not one
PROVIDER = "shm" if "shm" in LibfabricBackend().providers() else "tcp"


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_million_writes_eight_peers():
    kw = {"node": "127.0.0.1"} if PROVIDER == "tcp" else {}
    peers = [PeerProcess(PROVIDER, **kw) for _ in range(PEERS)]
    async with anyio.create_task_group() as tg:
        for p in peers:
            tg.start_soon(p.__aenter__)
    try:
        # baseline after one engine open/close, so one-time library setup is not counted
        async with af.Engine(PROVIDER, **kw) as warm:
            warm.register(np.zeros(4096, np.uint8)).close()
        gc.collect()
        rss0 = rss_kib()
        eng = await af.Engine.open(PROVIDER, **kw)
        inbox = eng.register(np.zeros(4096, np.uint8))
        desc = bytes(inbox.descriptor())
        base = eng.stats()
        srcs = []
        for p in peers:
            srcs.append((await p.alloc(64, seed=1))[0])

        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i, p in enumerate(peers):
                tg.start_soon(
                    lambda p=p, i=i: p.call(
                        "blast", srcs[i], desc, 500 + i, PER_PEER, 256, timeout=300
                    )
                )

            async def count(i: int) -> None:
                c = eng.counter(500 + i)
                for _ in range(PER_PEER // WAIT_STEP):
                    await c.wait(WAIT_STEP, timeout=120)

            for i in range(PEERS):
                tg.start_soon(count, i)
        took = time.monotonic() - t0
        await anyio.sleep(0.5)  # a duplicate would show up as a surplus
        for i in range(PEERS):
            assert eng.counter(500 + i).count == 0, f"peer {i}: immediates beyond {PER_PEER}"
        st = eng.stats()
        assert st["imms"] - base["imms"] == TOTAL
        assert st["live_counters"] == 0 and st["pending_ops"] == 0
        print(
            f"\n[soak] {PROVIDER}: {TOTAL} writes from {PEERS} peers in {took:.1f} s = {TOTAL / took:,.0f} writes/s"
        )
        inbox.close()
        assert eng.stats()["live_mrs"] == 0 and eng.stats()["live_regions"] == 0
        await eng.aclose()
        inbox = None
        gc.collect()
        rss1 = rss_kib()
        print(f"[soak] RSS before {rss0 / 1024:.1f} MiB, after close {rss1 / 1024:.1f} MiB")
        assert rss1 - rss0 < 16 * 1024, f"RSS grew by {(rss1 - rss0) / 1024:.1f} MiB"
    finally:
        async with anyio.create_task_group() as tg:
            for p in peers:
                tg.start_soon(p.aclose)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_million_writes_through_write_many():
    """1,000,000 writes through write_many (a reposted Batch of 10,000 8-byte writes
    round-robin over 4 peer processes): counts exact, memory back to baseline."""
    kw = {"node": "127.0.0.1"} if PROVIDER == "tcp" else {}
    npeers, per_batch = 4, 10_000
    posts = TOTAL // per_batch
    peers = [PeerProcess(PROVIDER, **kw) for _ in range(npeers)]
    async with anyio.create_task_group() as tg:
        for p in peers:
            tg.start_soon(p.__aenter__)
    try:
        async with af.Engine(PROVIDER, **kw) as warm:
            warm.register(np.zeros(4096, np.uint8)).close()
        gc.collect()
        rss0 = rss_kib()
        eng = await af.Engine.open(PROVIDER, **kw)
        src = eng.register(np.arange(4096, dtype=np.uint8))
        descs = [af.Descriptor.from_bytes((await p.alloc(4096))[1]) for p in peers]
        batch = af.Batch()
        k = per_batch // npeers
        for i, d in enumerate(descs):
            offs = (np.arange(k) % 512) * 8
            batch.add_many(src, d, offs, offs, 8, imm=700 + i)
        t0 = time.monotonic()
        for _ in range(posts):
            await eng.write_many(batch)
        async with anyio.create_task_group() as tg:
            for i, p in enumerate(peers):
                tg.start_soon(p.wait, 700 + i, posts * k, 120)
        took = time.monotonic() - t0
        await anyio.sleep(0.5)  # a duplicate would show up as a surplus
        for i, p in enumerate(peers):
            assert await p.call("count", 700 + i) == 0, f"peer {i}: immediates beyond {posts * k}"
        st = eng.stats()
        assert st["posts"] >= TOTAL and st["live_ops"] == 0 and st["pending_ops"] == 0
        print(
            f"\n[soak] {PROVIDER} write_many: {TOTAL} writes in {took:.1f} s = {TOTAL / took:,.0f}/s"
        )
        src.close()
        await eng.aclose()
        del batch, src
        gc.collect()
        rss1 = rss_kib()
        print(f"[soak] RSS before {rss0 / 1024:.1f} MiB, after close {rss1 / 1024:.1f} MiB")
        assert rss1 - rss0 < 16 * 1024, f"RSS grew by {(rss1 - rss0) / 1024:.1f} MiB"
    finally:
        async with anyio.create_task_group() as tg:
            for p in peers:
                tg.start_soon(p.aclose)
