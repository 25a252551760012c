"""The staged GPU path's protocol (pieces, landing notices, counting) on host memory.

CPU CI has no GPU, so these stage CPU torch tensors with the staged wrapper's
test switch (``eng.transport.stage_host_tensors = True``, or
``asyncfabric.testing.peer.register_staged``): the copies between tensor and
mirror are then plain host copies, but everything else (mirror registration,
pieces, writes without immediates, landing notices, crediting counters only
after the copy) is the real code path over a real provider. tests/test_gpu.py
runs the same on GPUs; tests/unit/test_staged_wrapper.py on the loopback.
"""

from __future__ import annotations

import random
import time

import anyio
import numpy as np
import pytest

import asyncfabric as af
from asyncfabric.backends.staged import CopyFailed
from asyncfabric.testing.peer import PeerProcess, register_staged, sha256

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.anyio

SIZES = [1, 7, 4096, 65_537, 1 << 20, (5 << 20) + 3, (9 << 20) + 1]


@pytest.mark.parametrize("src_staged,dst_staged", [(True, True), (True, False), (False, True)])
async def test_staged_write_sizes(provider, kw, src_staged, dst_staged):
    async with PeerProcess(provider, **kw) as peer, af.Engine(provider, **kw) as eng:
        top = max(SIZES)
        src = torch.randint(0, 256, (top,), dtype=torch.uint8)
        rid, desc_b = await peer.alloc_tensor(top, None, "cpu", dst_staged)
        desc = af.Descriptor.from_bytes(desc_b)
        assert desc.staged == dst_staged
        with register_staged(eng, src) if src_staged else eng.register(src) as region:
            assert region.staged == src_staged
            for i, n in enumerate(SIZES):
                off = random.randrange(0, top - n + 1)
                roff = random.randrange(0, top - n + 1)
                await eng.write(region[off : off + n], desc[roff : roff + n], imm=300 + i)
                await peer.wait(300 + i, desc.expected_imms(n))
                assert await peer.call("count", 300 + i) == 0  # exactly the rule's count
                assert await peer.digest(rid, roff, n) == sha256(src.numpy(), off, n)


async def test_staged_no_imm_then_imm_only(provider, kw):
    """A staged write without imm counts nothing; a write_imm to a staged region counts one."""
    async with PeerProcess(provider, **kw) as peer, af.Engine(provider, **kw) as eng:
        n = 3 << 20
        src = torch.randint(0, 256, (n,), dtype=torch.uint8)
        rid, desc_b = await peer.alloc_tensor(n, None, "cpu", True)
        desc = af.Descriptor.from_bytes(desc_b)
        eng.transport.stage_host_tensors = True
        with eng.register(src) as region:
            await eng.write(region, desc)
            await eng.write_imm(desc, 9)
            await peer.wait(9, 1)
            assert await peer.call("count", 9) == 0
            assert await peer.digest(rid, 0, n) == sha256(src.numpy())


async def test_staged_paged_refused(provider, kw):
    async with af.Engine(provider, **kw) as eng:
        t = torch.zeros(8192, dtype=torch.uint8)
        with register_staged(eng, t) as region:
            with pytest.raises(af.RegionError, match="write_paged"):
                await eng.write_paged(region, region.descriptor(), [0], [1], page_size=4096)


async def test_staged_failed_device_to_host_copy_fails_the_write(provider, kw):
    """A failed sender-side copy fails that write, naming the copy; the engine stays usable."""
    async with af.Engine(provider, **kw) as eng:
        n = (9 << 20) + 1  # three pieces: the failure comes while others are in flight
        src = torch.randint(0, 256, (n,), dtype=torch.uint8)
        dst = torch.zeros(n, dtype=torch.uint8)
        with register_staged(eng, src) as rs, register_staged(eng, dst) as rd:
            desc = rd.descriptor()
            eng.transport.staged_memory(rs.registration).fault = "d2h"
            with pytest.raises(CopyFailed, match="device-to-host"):
                await eng.write(rs, desc, imm=3, timeout=30)
            await eng.write(rs, desc, imm=4, timeout=30)
            await eng.counter(4).wait(desc.expected_imms(n), timeout=30)
            assert eng.counter(3).count == 0
            assert torch.equal(src, dst)


async def test_staged_failed_host_to_device_copy_fails_the_wait(provider, kw):
    """A failed receiver-side copy (its immediates can never count) fails a pending
    counter wait at once, through the transport's Fatal event, naming the copy."""
    async with af.Engine(provider, **kw) as eng:
        n = 1 << 20
        src = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
        dst = torch.zeros(n, dtype=torch.uint8)
        with eng.register(src) as rs, register_staged(eng, dst) as rd:
            desc = rd.descriptor()
            eng.transport.staged_memory(rd.registration).fault = "h2d"
            got: dict[str, BaseException | None] = {}

            async def wait() -> None:
                try:
                    await eng.counter(8).wait(desc.expected_imms(n), timeout=30)
                    got["wait"] = None
                except Exception as exc:
                    got["wait"] = exc

            async def write() -> None:
                try:
                    await eng.write(rs, desc, imm=8, timeout=30)
                    got["write"] = None
                except Exception as exc:  # the Fatal may also fail the write, if still pending
                    got["write"] = exc

            t0 = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await anyio.sleep(0.01)
                tg.start_soon(write)
            assert time.monotonic() - t0 < 10
            assert isinstance(got["wait"], CopyFailed), got
            assert "host-to-device" in str(got["wait"])
            assert got["write"] is None or isinstance(got["write"], CopyFailed)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_staged_mixed_batch_in_one_process(provider, kw):
    """write_many mixing staged and host entries, scatter and barrier into staged targets,
    between two engines of one process (the weights pattern): every entry lands, exactly
    counted. The host entries of a batch that has staged ones go entry by entry under
    sub-tokens, whose completions the wrapper once took for its own (and the batch then
    never ended)."""
    async with af.Engine(provider, **kw) as a, af.Engine(provider, **kw) as b:
        n = 6 << 20
        st_src = torch.randint(0, 256, (n,), dtype=torch.uint8)
        h_src = torch.randint(0, 256, (n,), dtype=torch.uint8)
        rs, rh = register_staged(a, st_src), a.register(h_src)
        d_host = b.register(torch.zeros(2 * n, dtype=torch.uint8))
        d_st = register_staged(b, torch.zeros(2 * n, dtype=torch.uint8))
        dh, ds = d_host.descriptor(), d_st.descriptor()
        bt = af.Batch()
        bt.add(rs[0:n], ds[0:n], imm=1)  # staged -> staged
        bt.add(rh[0:n], dh[0:n], imm=2)  # host -> host, beside them
        bt.add(rh[0:n], ds[n : 2 * n], imm=1)  # host -> staged
        bt.add(rs[0:n], dh[n : 2 * n], imm=2)  # staged -> host
        with anyio.fail_after(30):
            for _ in range(2):  # a reposted batch too
                await a.write_many(bt)
            await b.counter(1).wait(2 * 2 * ds.expected_imms(n))
            await b.counter(2).wait(2 * 2 * dh.expected_imms(n))
            assert torch.equal(d_st.buffer[:n], st_src) and torch.equal(d_st.buffer[n:], h_src)
            assert torch.equal(d_host.buffer[:n], h_src) and torch.equal(d_host.buffer[n:], st_src)
            await a.scatter(rs[0:4096], [ds[0:2048], dh[0:2048]], imm=3)
            await a.barrier([ds, dh, ds], 4)
            await b.counter(3).wait(2)
            await b.counter(4).wait(3)
            assert torch.equal(d_st.buffer[:2048], st_src[:2048])
            assert torch.equal(d_host.buffer[:2048], st_src[2048:4096])
        assert b.counter(1).count == 0 and b.counter(2).count == 0
