"""Several progress workers per engine (workers.c): each owns some domains; data and
counts must be exactly what one thread gives, on shm and tcp, and a lost peer still
fails its transfers in bounded time."""

from __future__ import annotations

import time

import anyio
import numpy as np
import pytest

import asyncfabric as af
from asyncfabric.testing.peer import PeerProcess, random_bytes, sha256

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("domains,workers", [(2, 2), (4, 2), (4, 4)])
async def test_workers_move_verified_data(provider, kw, domains, workers):
    async with (
        PeerProcess(provider, domains=domains, workers=workers, chunk_bytes=1 << 16, **kw) as peer,
        af.Engine(provider, domains=domains, workers=workers, cpus="auto", **kw) as eng,
    ):
        n = 3 << 20
        data = random_bytes(n, seed=11)
        rid, db = await peer.alloc(n)
        desc = af.Descriptor.from_bytes(db)
        src = eng.register(data)
        await eng.write(src, desc, imm=1)  # 48 chunks over every domain
        await peer.wait(1, desc.expected_imms(n))
        assert await peer.digest(rid, 0, n) == sha256(data)
        # many single-chunk writes at once: rotated over the domains
        await anyio.sleep(0)
        async with anyio.create_task_group() as tg:
            for i in range(64):
                tg.start_soon(lambda i=i: eng.write(src[i * 4096 : (i + 1) * 4096],
                                                    desc[i * 4096 : (i + 1) * 4096], imm=2))  # fmt: skip
        await peer.wait(2, 64)
        batch = af.Batch().add_many(src, desc, np.arange(500) * 8, np.arange(500) * 8, 8, imm=3)
        for _ in range(20):
            await eng.write_many(batch)
        await peer.wait(3, 10_000)
        await anyio.sleep(0.2)
        assert await peer.call("count", 3) == 0, "immediates beyond the count"
        back = np.zeros(n, np.uint8)
        with eng.register(back) as rb:
            await eng.read(rb, desc)
        assert sha256(back) == sha256(data)
        # the other way: the peer's workers deliver and count
        inbox = eng.register(np.zeros(4096, np.uint8))
        await peer.call("write_imms", (await peer.alloc(64))[0], bytes(inbox.descriptor()),
                        [7] * 100)  # fmt: skip
        await eng.counter(7).wait(100, timeout=10)
        assert eng.stats()["live_ops"] == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_workers_fail_a_killed_peer_in_bounded_time(provider, kw):
    timeout = 3.0
    async with (
        PeerProcess(provider, **kw) as victim,
        af.Engine(provider, domains=2, workers=2, peer_timeout=timeout, **kw) as eng,
    ):
        src = eng.register(np.ones(1 << 20, np.uint8))
        _, vb = await victim.alloc(1 << 20)
        vd = af.Descriptor.from_bytes(vb)
        await eng.write(src, vd, imm=1)
        victim.kill()
        await anyio.sleep(0.1)
        t0 = time.monotonic()
        with anyio.fail_after(timeout + 10), pytest.raises(af.PeerUnreachable):
            for _ in range(50):
                await eng.write(src, vd, imm=1)
        assert time.monotonic() - t0 < timeout + 5


async def test_workers_are_checked():
    with pytest.raises(ValueError, match="workers must be an int from 1 to domains"):
        af.Engine("shm", domains=2, workers=3)
    with pytest.raises(ValueError, match="cpus"):
        af.Engine("shm", domains=2, workers=2, cpus=[10_000])


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_workers_post_large_transfers_and_caller_posts_small(provider, kw):
    """Large pieces are posted by the workers (wpost.c), over every domain, and a batch
    mixing small and large entries lands exactly; small writes still go out inline."""
    async with (
        af.Engine(provider, domains=4, workers=4, chunk_bytes=1 << 16, **kw) as b,
        af.Engine(provider, domains=4, workers=4, **kw) as a,
    ):
        n = 4 << 20
        data = random_bytes(n, seed=5)
        back = np.zeros(n, np.uint8)
        dst = b.register(back)
        src = a.register(data)
        desc = dst.descriptor()
        before = a.stats()["worker_posts"]
        await a.write(src, desc, imm=1)
        await b.counter(1).wait(desc.expected_imms(n), timeout=10)  # 64 pieces
        assert a.stats()["worker_posts"] - before == desc.expected_imms(n)
        assert sha256(back) == sha256(data)
        # a batch of mixed sizes: 8 B entries inline or by a worker, 200 KiB ones by workers
        back[:] = 0
        sizes = [8, 200 << 10, 8, 8, 100 << 10, 3]
        offs = np.cumsum([0, *sizes[:-1]])
        batch = af.Batch()
        for o, s in zip(offs, sizes):
            batch.add(src[int(o) : int(o) + s], desc[int(o) : int(o) + s], imm=2)
        for _ in range(5):
            await a.write_many(batch)
        want = 5 * sum(desc.expected_imms(s) for s in sizes)
        await b.counter(2).wait(want, timeout=10)
        end = int(offs[-1]) + sizes[-1]
        assert sha256(back[:end]) == sha256(data[:end])
        # small writes: inline, never handed to the workers
        before = a.stats()["worker_posts"]
        for i in range(50):
            await a.write(src[i * 8 : i * 8 + 8], desc[i * 8 : i * 8 + 8], imm=3)
        await b.counter(3).wait(50, timeout=10)
        assert a.stats()["worker_posts"] == before
        await anyio.sleep(0.1)
        assert b.counter(1).count == 0 and b.counter(2).count == 0, "immediates beyond the count"
        assert a.stats()["live_ops"] == 0
