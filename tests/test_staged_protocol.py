"""The staged GPU path's protocol (pieces, landing notices, counting) on host memory.

CPU CI has no GPU, so these register CPU torch tensors with the private
``_force_staged`` switch: the copies between tensor and mirror are then plain
host copies, but everything else (mirror registration, pieces, writes without
immediates, landing notices, crediting counters only after the copy) is the
real code path over a real provider. tests/test_gpu.py runs the same on GPUs.
"""

from __future__ import annotations

import random

import pytest

import asyncfabric as af
from asyncfabric.testing.peer import PeerProcess, sha256

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
        with eng.register(src, _force_staged=src_staged) as region:
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
        with eng.register(src, _force_staged=True) as region:
            await eng.write(region, desc)
            await eng.write_imm(desc, 9)
            await peer.wait(9, 1)
            assert await peer.call("count", 9) == 0
            assert await peer.digest(rid, 0, n) == sha256(src.numpy())


async def test_staged_paged_refused(provider, kw):
    async with af.Engine(provider, **kw) as eng:
        t = torch.zeros(8192, dtype=torch.uint8)
        with eng.register(t, _force_staged=True) as region:
            with pytest.raises(af.RegionError, match="write_paged"):
                await eng.write_paged(region, region.descriptor(), [0], [1], page_size=4096)
