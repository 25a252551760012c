"""The libfabric transport's native posts refuse memory its provider cannot touch.

shm opened without FI_HMEM memcpy()s from the pointers it is given: a device pointer
there was a SIGSEGV in libfabric under ``afe_post_batch`` (the GPU weights run of
2026-12-06, docs/weights.md "GPU"). Every native path (batch, write, paged, read) now
checks the registrations and remotes it is handed and raises, naming the entry.

CPU CI has no device memory, so the "device" registrations here are host ones
relabelled (``dataclasses.replace``: a valid handle and a valid host pointer). Without
the guard each post would go through and land; with it, it is refused. The staged
ones are real (``register_staged``: a host mirror, as for a CUDA tensor).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import asyncfabric as af
from asyncfabric.transport import PagedWrite, WriteBatch
from asyncfabric.transport.counting import NO_IMM

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.anyio

N = 1 << 16


def _inner(eng: af.Engine):
    """The libfabric transport under the engine's wrappers."""
    t = eng.transport
    while hasattr(t, "inner"):
        t = t.inner
    assert t.backend == "libfabric"
    return t


def _batch(srcs, dsts, entries) -> WriteBatch:
    """entries: (src index, dst index, nbytes)."""
    n = len(entries)
    return WriteBatch(
        1 << 20,
        tuple(srcs),
        tuple(dsts),
        np.array([e[0] for e in entries], np.uint32),
        np.array([e[1] for e in entries], np.uint32),
        np.zeros(n, np.uint64),
        np.zeros(n, np.uint64),
        np.array([e[2] for e in entries], np.uint64),
        np.full(n, NO_IMM, np.int64),
        np.zeros(n, np.int32),
        {},
        {},
    )


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_native_posts_refuse_device_and_staged_memory(provider, kw):
    from asyncfabric.testing.peer import register_staged

    async with af.Engine(provider, **kw) as a, af.Engine(provider, **kw) as b:
        t = _inner(a)
        host = a.register(torch.zeros(N, dtype=torch.uint8))
        staged = register_staged(a, torch.zeros(N, dtype=torch.uint8))
        assert staged.staged
        dst_host = b.register(torch.zeros(N, dtype=torch.uint8))
        dst_staged = register_staged(b, torch.zeros(N, dtype=torch.uint8))
        ok = a._route(dst_host.descriptor()).remote
        staged_remote = a._route(dst_staged.descriptor()).remote
        assert type(staged_remote).__name__ == "StagedRemote"
        # a CUDA registration as cuda_ipc makes it, or a direct one on a non-HMEM domain
        fake_cuda = dataclasses.replace(host._reg, device="cuda", device_index=0)
        assert not t.hmem or provider != "shm"

        # the batch names the first entry that uses the bad source, whatever its index
        bad = _batch([host._reg, fake_cuda], [ok], [(0, 0, 64), (0, 0, 64), (1, 0, 64)])
        with pytest.raises(af.RegionError, match=r"batch entry 2: the source is cuda memory"):
            t.post_batch(bad)
        assert "libfabric" not in bad.cache  # nothing packed, nothing posted
        if not t.hmem:
            assert "without FI_HMEM" in str(
                pytest.raises(
                    af.RegionError, t.post_batch, _batch([fake_cuda], [ok], [(0, 0, 8)])
                ).value
            )
        # a staged registration's pointer is the tensor's, not its mirror's
        with pytest.raises(af.RegionError, match=r"batch entry 1: the source is staged cpu"):
            t.post_batch(_batch([host._reg, staged._reg], [ok], [(0, 0, 8), (1, 0, 8)]))
        # a wrapper's remote is not a region the native core can address
        with pytest.raises(af.RegionError, match=r"batch entry 1: the destination is a Staged"):
            t.post_batch(_batch([host._reg], [ok, staged_remote], [(0, 0, 8), (0, 1, 8)]))
        # single writes, paged writes and reads: the same checks
        with pytest.raises(af.RegionError, match=r"write of 64 bytes: the source is cuda"):
            t.post_write(2 << 20, ok, 0, fake_cuda, 0, 64, NO_IMM)
        with pytest.raises(af.RegionError, match=r"the source is staged"):
            t.post_write(2 << 20, ok, 0, staged._reg, 0, 64, NO_IMM)
        with pytest.raises(af.RegionError, match=r"the destination is a StagedRemote"):
            t.post_write(2 << 20, staged_remote, 0, host._reg, 0, 64, NO_IMM)
        pages = np.zeros(1, np.uint64)
        with pytest.raises(af.RegionError, match=r"paged write of 1 pages: the source is cuda"):
            t.post_paged(PagedWrite(3 << 20, ok, fake_cuda, pages, pages, 64, NO_IMM))
        with pytest.raises(af.RegionError, match=r"read of 64 bytes: the destination is cuda"):
            t.post_read(4 << 20, ok, 0, fake_cuda, 0, 64)
        with pytest.raises(af.RegionError, match=r"read of 64 bytes: the source is a Staged"):
            t.post_read(4 << 20, staged_remote, 0, host._reg, 0, 64)

        # host memory still goes the native way, and lands
        src_t = torch.arange(N, dtype=torch.uint8)
        src = a.register(src_t)
        await a.write_many(af.Batch().add_many(src, dst_host.descriptor(), [0], [0], N, imm=7))
        await b.counter(7).wait(dst_host.descriptor().expected_imms(N), timeout=10)
        assert torch.equal(dst_host.buffer, src_t)
