"""The engine's native fast path (engine/fastpath.py, engine/_fastpath.c).

It must be taken where it can be (every libfabric engine), give exactly what the
Python path gives (bytes, counts, errors), and step aside wherever the Python
path has something to decide: these tests check each of those cases against an
engine opened with the fast path turned off.
"""

from __future__ import annotations

from functools import partial

import anyio
import numpy as np
import pytest

import asyncfabric as af
from asyncfabric.engine import fastpath

pytestmark = pytest.mark.anyio

needs_native = pytest.mark.skipif(
    fastpath._native is None, reason="the fast path extension is not built"
)


async def _pair(provider: str, kw: dict, n: int = 1 << 20):
    a = await af.Engine.open(provider, **kw)
    b = await af.Engine.open(provider, **kw)
    src = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8)
    dst = np.zeros(n, np.uint8)
    rs, rd = a.register(src), b.register(dst)
    return a, b, src, dst, rs, rd


@needs_native
async def test_taken_for_slices_regions_and_descriptors(provider, kw):
    a, b, src, dst, rs, rd = await _pair(provider, kw)
    try:
        assert type(a._fp).__name__ == "FastPath"
        desc = af.Descriptor.from_bytes(bytes(rd.descriptor()))
        await a.write(rs[:8], desc[:8], imm=7)  # first write: the Python path caches the route
        before = a._fp.posts
        await a.write(rs[8:4096], desc[8:4096], imm=7)  # slice -> slice
        await a.write(rs[4096 : 65536 + 4096], desc[4096 : 65536 + 4096])  # no immediate
        await a.write(rs, desc, imm=7)  # whole region -> whole descriptor (1 MiB, no GIL)
        await a.write_imm(desc, 7)
        await a.write_imm(desc[100:200], 7)
        assert a._fp.posts - before == 5
        await b.counter(7).wait(1 + 1 + desc.expected_imms(len(src)) + 2, timeout=10)
        assert bytes(dst) == bytes(src)
    finally:
        await a.aclose()
        await b.aclose()


@needs_native
async def test_transfer_ends_are_resolved_natively(provider, kw):
    """Concurrent writes that end by an event: the fast path's complete() resolves
    their waiters (ends counts them) with the same bookkeeping as Engine._on_op."""
    a, b, src, dst, rs, rd = await _pair(provider, kw)
    try:
        desc = rd.descriptor()
        await a.write(rs[:8], desc[:8])  # the route is cached on the Python path
        n, before = 16, a._fp.ends
        size = len(src) // n

        async with anyio.create_task_group() as tg:
            for k in range(n):
                part = slice(k * size, (k + 1) * size)
                tg.start_soon(partial(a.write, rs[part], desc[part], imm=5))
        await b.counter(5).wait(n * desc.expected_imms(size), timeout=10)
        assert bytes(dst) == bytes(src)
        assert a._fp.ends > before
        assert rs._inflight == 0 and not a._ops
        # a closed region's last end deregisters it: left to the Python path
        done = anyio.Event()

        async def last() -> None:
            await a.write(rs, desc, imm=6)
            done.set()

        mrs = a.stats()["live_mrs"]
        async with anyio.create_task_group() as tg:
            tg.start_soon(last)
            while not a._ops and not done.is_set():  # until its write was posted
                await anyio.sleep(0)
            rs.close()
        await done.wait()
        assert rs._inflight == 0 and a.stats()["live_mrs"] == mrs - 1
    finally:
        await a.aclose()
        await b.aclose()


@needs_native
async def test_counter_wait_takes_natively(provider, kw):
    a, b, src, dst, rs, rd = await _pair(provider, kw, 4096)
    try:
        desc = rd.descriptor()
        for _ in range(50):
            await a.write(rs[:8], desc[:8], imm=3)
            await b.counter(3).wait(1, timeout=5)
        assert b.counter(3).count == 0
        assert b.stats()["pending_ops"] == 0
    finally:
        await a.aclose()
        await b.aclose()


@needs_native
async def test_steps_aside_with_the_python_paths_errors(provider, kw):
    a, b, src, dst, rs, rd = await _pair(provider, kw, 4096)
    try:
        desc = rd.descriptor()
        await a.write(rs[:8], desc[:8])
        posts = a._fp.posts
        with pytest.raises(ValueError, match="source has 8 bytes but destination has 16"):
            await a.write(rs[:8], desc[:16])
        for bad in (-1, 1 << 32, True, 1.0, "7"):
            with pytest.raises((ValueError, TypeError)):
                await a.write(rs[:8], desc[:8], imm=bad)
            with pytest.raises((ValueError, TypeError)):
                await a.write_imm(desc, bad)
        with pytest.raises(TypeError, match="must be a Region"):
            await a.write(memoryview(src), desc[:8])
        with pytest.raises(TypeError, match="not a local Region"):
            await a.write(rs[:8], rd[:8])
        other = b.register(np.zeros(8, np.uint8))
        with pytest.raises(af.RegionError, match="another engine"):
            await a.write(other, desc[:8])
        region = a.register(np.zeros(64, np.uint8))
        region.close()
        with pytest.raises(af.RegionError, match="unregistered"):
            await a.write(region[:8], desc[:8])
        assert a._fp.posts == posts  # none of these was posted natively
        # a destination in the writing engine itself is checked on every write
        own = a.register(np.zeros(64, np.uint8))
        own_desc = own.descriptor()
        await a.write(rs[:8], own_desc[:8])
        own.close()
        with pytest.raises(af.RegionError, match="unregistered"):
            await a.write(rs[:8], own_desc[:8])
        assert a._fp.posts == posts
    finally:
        await a.aclose()
        await b.aclose()
    with pytest.raises(af.EngineClosed):
        await a.write(rs[:8], desc[:8])
    with pytest.raises(af.EngineClosed):
        await a.write_imm(desc, 1)


@needs_native
async def test_closed_gate_sends_everything_the_python_way(provider, kw):
    """A wrapper that takes over the hot paths closes the native table's gate."""
    a, b, src, dst, rs, rd = await _pair(provider, kw, 1 << 16)
    try:
        desc = rd.descriptor()
        await a.write(rs[:8], desc[:8], imm=1)
        a.transport.native_ops().close()
        posts = a._fp.posts
        await a.write(rs, desc, imm=1)
        await a.write_imm(desc, 1)
        await b.counter(1).wait(1 + desc.expected_imms(len(src)) + 1, timeout=5)
        assert a._fp.posts == posts
        assert bytes(dst) == bytes(src)
    finally:
        await a.aclose()
        await b.aclose()


async def test_turned_off_by_env(provider, kw, monkeypatch):
    monkeypatch.setenv("ASYNCFABRIC_FASTPATH", "0")
    a, b, src, dst, rs, rd = await _pair(provider, kw, 1 << 16)
    try:
        assert isinstance(a._fp, fastpath.NoFastPath)
        desc = rd.descriptor()
        await a.write(rs, desc, imm=2)
        await b.counter(2).wait(desc.expected_imms(len(src)), timeout=5)
        assert bytes(dst) == bytes(src)
    finally:
        await a.aclose()
        await b.aclose()


@needs_native
async def test_tokens_are_shared_by_both_paths(provider, kw):
    """Writes posted natively and through Python, in flight together, all end."""
    import anyio

    a, b, src, dst, rs, rd = await _pair(provider, kw, 1 << 22)
    try:
        desc = rd.descriptor()
        await a.write(rs[:8], desc[:8])
        chunk = 1 << 18
        async with anyio.create_task_group() as tg:
            for i in range(16):
                s, d = rs[i * chunk : (i + 1) * chunk], desc[i * chunk : (i + 1) * chunk]
                if i % 2:
                    tg.start_soon(lambda s=s, d=d: a.write(s, d, imm=5))
                else:  # the stream argument sends it the Python way
                    tg.start_soon(lambda s=s, d=d: a.write(s, d, imm=5, stream=0))
        await b.counter(5).wait(16, timeout=10)
        assert bytes(dst) == bytes(src)
        assert a.stats()["pending_ops"] == 0
    finally:
        await a.aclose()
        await b.aclose()
