"""Cancellation and close with transfers in flight: nothing dangles, nothing hangs,
every future ends."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

import asyncfabric as af
from asyncfabric.testing.peer import PeerProcess, random_bytes

pytestmark = pytest.mark.anyio


async def _settle(eng, timeout=10.0):
    with anyio.fail_after(timeout):
        while eng.stats()["pending_ops"] or eng.stats()["live_ops"]:
            await anyio.sleep(0.01)


async def test_cancel_waits_mid_stream(provider, kw):
    async with PeerProcess(provider, **kw) as peer, af.Engine(provider, **kw) as eng:
        inbox = eng.register(np.zeros(4096, np.uint8))
        src_id, _ = await peer.alloc(64, seed=1)
        total = 3000
        async with anyio.create_task_group() as tg:
            tg.start_soon(peer.call, "blast", src_id, bytes(inbox.descriptor()), 11, total, 64)
            for _ in range(20):  # waits cancelled while immediates stream in
                with anyio.move_on_after(0.01):
                    await eng.counter(11).wait(total * 2)
        c = eng.counter(11)
        assert not c._waiters, "a cancelled wait stayed queued"
        await c.wait(total, timeout=30)  # cancelled waits consumed nothing
        assert c.count == 0
        assert eng.stats()["live_counters"] == 0


async def test_cancel_write_tasks_mid_transfer(provider, kw):
    async with PeerProcess(provider, **kw) as peer, af.Engine(provider, **kw) as eng:
        n = 1 << 20
        _, desc_b = await peer.alloc(n)
        desc = af.Descriptor.from_bytes(desc_b)
        region = eng.register(random_bytes(n, seed=3))
        with anyio.move_on_after(0.02):
            async with anyio.create_task_group() as tg:
                for _ in range(64):
                    tg.start_soon(lambda: eng.write(region, desc, imm=12))
        await _settle(eng)  # the RDMA writes themselves finish; none is left behind
        region.close()
        assert eng.stats()["live_mrs"] == 0 and eng.stats()["live_regions"] == 0


async def test_close_with_transfers_in_flight(provider, kw):
    async with PeerProcess(provider, **kw) as peer:
        eng = await af.Engine.open(provider, **kw)
        n = 1 << 20
        _, desc_b = await peer.alloc(n)
        desc = af.Descriptor.from_bytes(desc_b)
        region = eng.register(random_bytes(n, seed=4))
        outcomes: list[str] = []

        async def run(coro) -> None:
            try:
                await coro
                outcomes.append("done")
            except af.EngineClosed:
                outcomes.append("closed")

        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                for _ in range(32):
                    tg.start_soon(run, eng.write(region, desc, imm=13))
                tg.start_soon(run, eng.counter(99).wait(1))
                tg.start_soon(run, eng.recv())
                await anyio.sleep(0.005)
                await eng.aclose()
        assert len(outcomes) == 34, outcomes
        assert outcomes.count("closed") >= 2  # the wait and the recv at least
        with pytest.raises(af.EngineClosed):
            await eng.write(region, desc)
