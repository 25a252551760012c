"""Batches and reads on real providers (shm, tcp), posted natively by the libfabric core:
data verified at a peer process, counts exact, partial failures named, a killed
peer failing only its own entries in bounded time."""

from __future__ import annotations

import time

import anyio
import numpy as np
import pytest

import asyncfabric as af
from asyncfabric.testing.peer import PeerProcess, random_bytes, sha256

pytestmark = pytest.mark.anyio

CHUNK = 1 << 16


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_write_many_to_two_peers_verified(provider, kw):
    async with (
        PeerProcess(provider, chunk_bytes=CHUNK, **kw) as p1,
        PeerProcess(provider, chunk_bytes=CHUNK, **kw) as p2,
        af.Engine(provider, **kw) as eng,
    ):
        top = 3 << 20
        src = random_bytes(top, seed=5)
        r1, d1b = await p1.alloc(top)
        r2, d2b = await p2.alloc(top)
        d1, d2 = af.Descriptor.from_bytes(d1b), af.Descriptor.from_bytes(d2b)
        region = eng.register(src)
        sizes = [1, 8, 4096, CHUNK + 1, 1 << 20, (1 << 20) + 7]
        batch, want, off = af.Batch(), {1: 0, 2: 0}, 0
        for n in sizes:
            for peer, d in ((1, d1), (2, d2)):
                batch.add(region[off : off + n], d[off : off + n], imm=peer)
                want[peer] += d.expected_imms(n)
            off += n
        assert len(batch) == 2 * len(sizes)
        for _ in range(3):  # a reposted batch: the counts add up every time
            await eng.write_many(batch)
        await p1.wait(1, 3 * want[1])
        await p2.wait(2, 3 * want[2])
        assert await p1.call("count", 1) == 0 and await p2.call("count", 2) == 0
        for rid, p in ((r1, p1), (r2, p2)):
            assert await p.digest(rid, 0, off) == sha256(src, 0, off)
        # pages as a batch, scatter and barrier
        await eng.write_many(
            af.Batch().add_pages(region, d1, [5, 0, 9], [2, 7, 1], page_size=4096, imm=3)
        )
        await p1.wait(3, 3)
        for s, dpage in ((5, 2), (0, 7), (9, 1)):
            assert await p1.digest(r1, dpage * 4096, 4096) == sha256(src, s * 4096, 4096)
        await eng.scatter(region[:6000], [d1[100:2100], d2[0:4000]], imm=4)
        await p1.wait(4, 1)
        await p2.wait(4, 1)
        assert await p1.digest(r1, 100, 2000) == sha256(src, 0, 2000)
        assert await p2.digest(r2, 0, 4000) == sha256(src, 2000, 4000)
        await eng.barrier([d1, d2, d2], 6)
        await p1.wait(6, 1)
        await p2.wait(6, 2)
        assert eng.stats()["live_ops"] == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_read_verified(provider, kw):
    async with PeerProcess(provider, **kw) as peer, af.Engine(provider, **kw) as eng:
        n = (2 << 20) + 3
        rid, db = await peer.alloc(n, seed=9)
        desc = af.Descriptor.from_bytes(db)
        want = random_bytes(n, seed=9)
        dst = np.zeros(n, np.uint8)
        with eng.register(dst) as region:
            await eng.read(region, desc)
            assert sha256(dst) == sha256(want)
            dst[:] = 0
            await eng.read(region[10:4106], desc[500:4596])
            assert (dst[10:4106] == want[500:4596]).all() and not dst[:10].any()
        _, rob = await peer.call("alloc", 64, None, True)
        assert af.Descriptor.from_bytes(rob).remote_read


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_revoked_entries_fail_alone(provider, kw):
    """Entries into a region the peer unregistered fail, by index; the rest land."""
    n = 1 << 16  # completion-tracked (not injected), so the sender hears of a denial
    async with (
        PeerProcess(provider, **kw) as peer,
        af.Engine(provider, peer_timeout=3, **kw) as eng,
    ):
        src = eng.register(np.full(n, 0xCD, np.uint8))
        ok_rid, okb = await peer.alloc(4 * n)
        bad_rid, badb = await peer.alloc(n)
        ok, bad = af.Descriptor.from_bytes(okb), af.Descriptor.from_bytes(badb)
        await peer.call("unregister", bad_rid)
        ops = [(src, ok[i * n : (i + 1) * n], 7) for i in range(4)]
        ops.insert(2, (src, bad, 8))
        t0 = time.monotonic()
        with anyio.fail_after(15):
            try:
                await eng.write_many(ops)
                outcome = None
            except af.BatchError as exc:
                outcome = exc
        print(f"\n[batch] {provider} revoked entry: {outcome!r} in {time.monotonic() - t0:.2f} s")
        failed = set() if outcome is None else set(outcome.failures)
        # Named: the denied entry, and what was still in flight behind it when the peer
        # was given up on (shm queues those behind it and they land late; tcp drops
        # the connection and they fail). Every entry not named landed.
        assert outcome is None or 2 in failed
        slot = {0: 0, 1: 1, 3: 2, 4: 3}  # entry -> its place in the good region
        landed = [slot[i] for i in slot if i not in failed]
        assert 0 in landed
        await peer.wait(7, len(landed))
        for k in landed:
            assert await peer.digest(ok_rid, k * n, n) == sha256(np.full(n, 0xCD, np.uint8))
        assert await peer.call("count", 8) == 0, "the denied entry's immediate was counted"
        got = np.frombuffer(await peer.call("read", bad_rid, 0, n), np.uint8)
        assert not got.any(), "the denied entry landed"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_killed_peer_fails_only_its_entries(provider, kw):
    timeout = 3.0
    async with (
        PeerProcess(provider, **kw) as victim,
        PeerProcess(provider, **kw) as bystander,
        af.Engine(provider, peer_timeout=timeout, **kw) as eng,
    ):
        n = 1 << 20
        data = random_bytes(n, seed=3)
        src = eng.register(data)
        _, vb = await victim.alloc(n)
        brid, bb = await bystander.alloc(n)
        vd, bd = af.Descriptor.from_bytes(vb), af.Descriptor.from_bytes(bb)
        batch = af.Batch()
        for i in range(16):
            batch.add(src[i * 65536 : (i + 1) * 65536], vd[i * 65536 : (i + 1) * 65536], imm=1)
            batch.add(src[i * 65536 : (i + 1) * 65536], bd[i * 65536 : (i + 1) * 65536], imm=2)
        await eng.write_many(batch)  # both reachable: all lands
        await bystander.wait(2, 16)
        victim.kill()
        await anyio.sleep(0.1)
        t0 = time.monotonic()
        with anyio.fail_after(timeout + 10):
            with pytest.raises((af.BatchError, af.PeerUnreachable)) as ei:
                await eng.write_many(batch)
        took = time.monotonic() - t0
        print(f"\n[batch] {provider} killed peer: {type(ei.value).__name__} in {took:.2f} s")
        assert took < timeout + 5
        if isinstance(ei.value, af.BatchError):
            assert set(ei.value.failures) <= set(range(0, 32, 2))  # the victim's entries only
            await bystander.wait(2, 16)
        # the engine goes on serving the bystander
        await eng.write(src, bd, imm=5)
        await bystander.wait(5, bd.expected_imms(n))
        assert await bystander.digest(brid, 0, n) == sha256(data)
