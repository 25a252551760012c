"""Batches on the loopback transport: the contract's fallback (each entry through
post_write under a sub-token), folded back into one await by the engine."""

from __future__ import annotations

import numpy as np
import pytest

import asyncfabric as af
from asyncfabric.transport import status
from asyncfabric.transport.batching import SUB_BIT, split_sub, sub_token

pytestmark = pytest.mark.anyio


async def _pair(**kw):
    a = await af.Engine.open("loopback", **kw)
    b = await af.Engine.open("loopback", **kw)
    return a, b


def test_sub_tokens_round_trip():
    for tok, i in ((1, 0), (12345, 77), ((1 << 39) - 1, (1 << 24) - 1)):
        st = sub_token(tok, i)
        assert st & SUB_BIT
        assert split_sub(st) == (tok, i)


async def test_write_many_counts_and_lands(lb):
    a, b = await _pair(chunk_bytes=4096)
    try:
        dst = np.zeros(1 << 16, np.uint8)
        src = np.random.default_rng(2).integers(0, 256, 1 << 16, dtype=np.uint8)
        with a.register(dst) as rd, b.register(src) as rs:
            desc = af.Descriptor.from_bytes(bytes(rd.descriptor()))
            sizes = [1, 4096, 4097, 10_000]
            ops, off = [], 0
            for k, n in enumerate(sizes):
                ops.append((rs[off : off + n], desc[off : off + n], 20 + k % 2))
                off += n
            await b.write_many(ops)
            want = {20: 0, 21: 0}
            for k, n in enumerate(sizes):
                want[20 + k % 2] += desc.expected_imms(n)
            for imm, n in want.items():
                await a.counter(imm).wait(n, timeout=1)
            assert (dst[:off] == src[:off]).all()
            # a Batch reposted: the counts add up, every time
            batch = af.Batch().add_many(rs, desc, [0, 8192], [100, 200], 64, imm=5)
            for _ in range(3):
                await b.write_many(batch)
            await a.counter(5).wait(6, timeout=1)
            await b.barrier([desc, desc[10:20]], 6)
            await a.counter(6).wait(2, timeout=1)
    finally:
        a.close()
        b.close()


async def test_bad_entry_refused_before_anything_is_posted(lb):
    a, b = await _pair()
    try:
        with a.register(np.zeros(4096, np.uint8)) as rd, b.register(np.ones(4096, np.uint8)) as rs:
            desc = rd.descriptor()
            ops = [(rs[:8], desc[:8], 1)] * 3 + [(rs[:8], desc[:16], 1)]
            with pytest.raises(ValueError, match="batch entry 3"):
                await b.write_many(ops)
            with pytest.raises(af.RegionError, match="batch entry 3"):
                af.Batch().add(rs[:8], desc[:8]).add_many(
                    rs, desc, [0, 8, 4090, 0], [0, 8, 16, 0], 8
                )
            with pytest.raises(ValueError, match="batch entry 2: imm"):
                af.Batch().add_many(rs, desc, [0, 8, 16], [0, 8, 16], 8, imm=[1, 2, -3])
            with pytest.raises(TypeError, match="batch entry 1"):
                await b.write_many([(rs[:8], desc[:8]), (desc[:8], rs[:8])])
            assert a.counter(1).count == 0  # nothing went out
            ro = a.register(np.zeros(64, np.uint8), remote_write=False)
            with pytest.raises(af.RegionError, match="batch entry 1.*remote_write=False"):
                await b.write_many([(rs[:8], desc[:8]), (rs[:8], ro.descriptor()[:8])])
            assert a.counter(1).count == 0
            with pytest.raises(ValueError, match="empty"):
                await b.write_many(af.Batch())
    finally:
        a.close()
        b.close()


async def test_partial_failure_names_the_entries(lb):
    a, b = await _pair()
    try:
        with a.register(np.zeros(4096, np.uint8)) as rd, b.register(np.ones(4096, np.uint8)) as rs:
            desc = rd.descriptor()
            b.transport.fail_next(status.ACCESS_DENIED)  # the first entry fails
            with pytest.raises(af.BatchError) as ei:
                await b.write_many([(rs[i : i + 8], desc[i : i + 8], 3) for i in range(0, 32, 8)])
            assert set(ei.value.failures) == {0}
            assert isinstance(ei.value.failures[0], af.RemoteAccessError)
            assert "1 of 4 writes" in str(ei.value) and "entry 0" in str(ei.value)
            await a.counter(3).wait(3, timeout=1)  # the other three landed
            assert rs._inflight == 0
    finally:
        a.close()
        b.close()


async def test_batch_to_a_lost_peer_fails_and_frees(lb):
    a, b = await _pair()
    c = await af.Engine.open("loopback")
    try:
        with (
            a.register(np.zeros(4096, np.uint8)) as rd,
            c.register(np.zeros(4096, np.uint8)) as rc,
            b.register(np.ones(4096, np.uint8)) as rs,
        ):
            da, dc = rd.descriptor(), rc.descriptor()
            b.connect(dc)
            b.transport.kill_peer(b.connect(dc).id)
            with pytest.raises(af.BatchError) as ei:
                await b.scatter(rs[:64], [da[:32], dc[:32]], imm=4)
            assert set(ei.value.failures) == {1}
            await a.counter(4).wait(1, timeout=1)
    finally:
        a.close()
        b.close()
        c.close()


async def test_read_is_refused_where_the_transport_has_none(lb):
    a, b = await _pair()
    try:
        with a.register(np.zeros(64, np.uint8)) as rd, b.register(np.ones(64, np.uint8)) as rs:
            with pytest.raises(af.Unsupported, match="no one-sided read"):
                await b.read(rs[:8], rd.descriptor()[:8])
            ro = a.register(np.zeros(64, np.uint8), remote_read=False)
            with pytest.raises(af.RegionError, match="remote_read=False"):
                await b.read(rs[:8], ro.descriptor()[:8])
    finally:
        a.close()
        b.close()


async def test_add_table_is_add_many_over_several_buffers(lb):
    """add_table compiles to exactly the entries of the add_many calls it stands for
    (mixed order, repeated and unused table items), lands the same bytes, and refuses
    bad entries naming the first one."""
    a, b = await _pair()
    try:
        rng = np.random.default_rng(7)
        srcs_np = [rng.integers(0, 256, 4096, dtype=np.uint8) for _ in range(3)]
        dsts_np = [np.zeros(4096, np.uint8) for _ in range(2)]
        rs = [b.register(x) for x in srcs_np]
        rd = [a.register(x) for x in dsts_np]
        descs = [af.Descriptor.from_bytes(bytes(r.descriptor())) for r in rd]
        si = np.array([2, 0, 2, 1, 0])
        di = np.array([1, 1, 0, 0, 1])
        so = np.array([0, 64, 128, 1024, 4000])
        do = np.array([0, 512, 64, 2048, 96])
        nb = np.array([64, 32, 16, 100, 96])
        imm = np.array([1, 2, 1, 3, 2])
        table = af.Batch().add_table(rs, descs, si, di, so, do, nb, imm=imm)
        ref = af.Batch()
        for k in range(len(si)):
            ref.add_many(rs[si[k]], descs[di[k]], so[k : k + 1], do[k : k + 1], nb[k : k + 1],
                         imm=imm[k : k + 1])  # fmt: skip
        ct, cr = table.compile(b), ref.compile(b)
        for col in ("soff", "doff", "nbytes", "imm"):
            assert (getattr(ct, col) == getattr(cr, col)).all(), col
        # the same registration and remote for each entry (slot numbers may differ)
        assert [ct.srcs[i] for i in ct.src] == [cr.srcs[i] for i in cr.src]
        assert [ct.dsts[i].target for i in ct.dst] == [cr.dsts[i].target for i in cr.dst]
        await b.write_many(table)
        for k in range(len(si)):
            got = dsts_np[di[k]][do[k] : do[k] + nb[k]]
            assert (got == srcs_np[si[k]][so[k] : so[k] + nb[k]]).all()
        for i, n in ((1, 2), (2, 2), (3, 1)):
            await a.counter(i).wait(n, timeout=1)

        with pytest.raises(ValueError, match="batch entry 3: src_index is 3"):
            af.Batch().add_table(rs, descs, [0, 1, 2, 3], 0, [0] * 4, [0] * 4, 8)
        with pytest.raises(ValueError, match="batch entry 1: dst_index is -1"):
            af.Batch().add_table(rs, descs, 0, [0, -1], [0, 0], [0, 0], 8)
        with pytest.raises(af.RegionError, match="batch entry 2: 64 bytes at offset 4090"):
            af.Batch().add_table(rs, descs, 0, 0, [0, 0, 4090], [0, 0, 0], 64)
        with pytest.raises(TypeError, match=r"srcs\[1\] is not a Region"):
            af.Batch().add_table([rs[0], srcs_np[1]], descs, 0, 0, [0], [0], 8)
    finally:
        for r in (*rs, *rd):
            r.close()
        a.close()
        b.close()
