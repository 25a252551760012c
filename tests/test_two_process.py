"""Two OS processes on loopback, for every provider present, under asyncio and trio."""

from __future__ import annotations

import random

import anyio
import numpy as np
import pytest

import asyncfabric as af
from asyncfabric.testing.peer import PeerProcess, random_bytes, sha256

pytestmark = pytest.mark.anyio

SIZES = [1, 7, 4096, 65_537, 1 << 20, (5 << 20) + 3]


async def test_write_sizes_verified(provider, kw):
    async with PeerProcess(provider, **kw) as peer, af.Engine(provider, **kw) as eng:
        top = max(SIZES)
        src = random_bytes(top)
        rid, desc_b = await peer.alloc(top)
        desc = af.Descriptor.from_bytes(desc_b)
        with eng.register(src) as region:
            for i, n in enumerate(SIZES):
                off = random.randrange(0, top - n + 1)
                roff = random.randrange(0, top - n + 1)
                await eng.write(region[off : off + n], desc[roff : roff + n], imm=100 + i)
                await peer.wait(100 + i, desc.expected_imms(n))
                assert await peer.digest(rid, roff, n) == sha256(src, off, n)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_write_256mib(provider, kw):
    n = 256 << 20
    async with PeerProcess(provider, **kw) as peer, af.Engine(provider, **kw) as eng:
        src = random_bytes(n, seed=1)
        rid, desc_b = await peer.alloc(n)
        desc = af.Descriptor.from_bytes(desc_b)
        with eng.register(src) as region:
            await eng.write(region, desc, imm=5)
        assert desc.expected_imms() == n // desc.chunk_bytes
        await peer.wait(5, desc.expected_imms(), timeout=120)
        assert await peer.digest(rid, 0, n) == sha256(src)


async def test_receiver_counts_out_of_order(provider, kw):
    """The peer writes 300 immediates over 30 values in random order, all in flight at
    once; we wait on the counters in another random order, some after all arrived."""
    async with PeerProcess(provider, **kw) as peer, af.Engine(provider, **kw) as eng:
        dst = np.zeros(64, np.uint8)
        with eng.register(dst) as region:
            imms = [v for v in range(1000, 1030) for _ in range(10)]
            random.shuffle(imms)
            src_id, _ = await peer.alloc(64, seed=3)
            await peer.call("write_imms", src_id, bytes(region.descriptor()), imms)
            order = list(range(1000, 1030))
            random.shuffle(order)
            for v in order:
                await eng.counter(v).wait(10, timeout=10)
                assert eng.counter(v).count == 0
            assert eng.stats()["live_counters"] == 0


async def test_paged_random_maps(provider, kw):
    page, stride = 4096, 5000
    npages = 2000
    async with PeerProcess(provider, **kw) as peer, af.Engine(provider, **kw) as eng:
        src = random_bytes(npages * page, seed=11)
        rid, desc_b = await peer.alloc(npages * stride + 64)
        desc = af.Descriptor.from_bytes(desc_b)
        rng = np.random.default_rng(5)
        sp = rng.permutation(npages)
        dp = rng.permutation(npages)
        with eng.register(src) as region:
            n = await eng.write_paged(
                region, desc, sp, dp, page_size=page, dst_stride=stride, dst_offset=64, imm=77
            )
        assert n == npages == desc.expected_imms(pages=npages)
        await peer.wait(77, npages)
        got = np.frombuffer(await peer.call("read", rid, 0, npages * stride + 64), np.uint8)
        for s, d in zip(sp[:200], dp[:200]):
            assert np.array_equal(
                got[64 + d * stride : 64 + d * stride + page], src[s * page : (s + 1) * page]
            )
        # every page, cheaply: the same bytes as the expected image
        want = np.zeros_like(got)
        for s, d in zip(sp, dp):
            want[64 + d * stride : 64 + d * stride + page] = src[s * page : (s + 1) * page]
        assert sha256(got) == sha256(want)


@pytest.mark.parametrize("domains", [2, 4])
async def test_striped_over_domains(provider, kw, domains):
    n = (8 << 20) + 1234
    async with (
        PeerProcess(provider, domains=domains, chunk_bytes=1 << 20, **kw) as peer,
        af.Engine(provider, domains=domains, chunk_bytes=1 << 20, **kw) as eng,
    ):
        src = random_bytes(n)
        rid, desc_b = await peer.alloc(n)
        desc = af.Descriptor.from_bytes(desc_b)
        assert len(desc.keys) == domains
        with eng.register(src) as region:
            await eng.write(region, desc, imm=9)
        assert desc.expected_imms(n) == 9
        await peer.wait(9, 9)
        assert await peer.digest(rid, 0, n) == sha256(src)


async def test_many_outstanding(provider, kw):
    count, size = 500, 16384
    async with PeerProcess(provider, **kw) as peer, af.Engine(provider, **kw) as eng:
        src = random_bytes(count * size)
        rid, desc_b = await peer.alloc(count * size)
        desc = af.Descriptor.from_bytes(desc_b)
        with eng.register(src) as region:

            async def one(i: int) -> None:
                sl = slice(i * size, (i + 1) * size)
                await eng.write(region[sl], desc[sl], imm=0)

            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(one, i)
        await peer.wait(0, count)
        assert await peer.digest(rid, 0, count * size) == sha256(src)


async def test_send_recv_both_ways(provider, kw):
    async with PeerProcess(provider, **kw) as peer, af.Engine(provider, **kw) as eng:
        await eng.send(peer.address, b"ping")
        assert await peer.call("recv", 10) == b"ping"
        await peer.call("send", eng.address, b"pong" * 100)
        assert await eng.recv(timeout=10) == b"pong" * 100
        big = bytes(range(256)) * (eng.ctrl_max // 256)
        await eng.send(peer.address, big)
        assert await peer.call("recv", 10) == big


async def test_immediate_only_write(provider, kw):
    async with PeerProcess(provider, **kw) as peer, af.Engine(provider, **kw) as eng:
        _, desc_b = await peer.alloc(64)
        desc = af.Descriptor.from_bytes(desc_b)
        for _ in range(3):
            await eng.write_imm(desc, 0xFFFFFFFF)
        await peer.wait(0xFFFFFFFF, 3)
        assert await peer.call("count", 0xFFFFFFFF) == 0
