"""KV transfer between two real engines (shm): pages land where granted, counted per request."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import asyncfabric as af
from asyncfabric.kv import (
    KVDecode,
    KVLayout,
    KVPrefill,
    LayoutMismatch,
    OutOfBlocks,
    RequestAborted,
    block_hashes,
)

pytestmark = pytest.mark.asyncio


def lay(**kw):
    base = dict(layers=3, blocks=16, block_tokens=4, kv_heads=2, head_dim=8, dtype="float32")
    base.update(kw)
    return KVLayout(**base)


def fill(pre, req, seed):
    g = torch.Generator().manual_seed(seed)
    for layer in range(pre.layout.layers):
        k, v = pre.cache.layer(layer)
        for b in req.blocks:
            k[int(b)] = torch.randn(k.shape[1:], generator=g)
            v[int(b)] = torch.randn(v.shape[1:], generator=g)


def same(pre, dec, req_p, req_d, start=0):
    for layer in range(pre.layout.layers):
        kp, vp = pre.cache.layer(layer)
        kd, vd = dec.cache.layer(layer)
        for sb, db in zip(req_p.blocks[start:], req_d.blocks[start:]):
            assert torch.equal(kp[int(sb)], kd[int(db)]), (layer, sb, db)
            assert torch.equal(vp[int(sb)], vd[int(db)]), (layer, sb, db)


async def pair(dlay, play):
    de = await af.Engine.open("shm")
    pe = await af.Engine.open("shm")
    dec = KVDecode(de, dlay)
    pre = KVPrefill(pe, play)
    await dec.start()
    await pre.start()
    return de, pe, dec, pre


async def close(de, pe, dec, pre):
    await pre.aclose()
    await dec.aclose()
    await pe.aclose()
    await de.aclose()


@pytest.mark.parametrize(
    "dopts,popts",
    [
        ({}, {}),
        ({"order": "block_first"}, {"order": "block_first"}),
        ({"tensors": "one", "order": "block_first"}, {"tensors": "per_layer_kv"}),
        ({"tensors": "per_layer_kv"}, {"tensors": "one"}),
    ],
)
async def test_pages_land_where_granted(dopts, popts):
    de, pe, dec, pre = await pair(lay(**dopts), lay(blocks=8, **popts))
    try:
        link = await pre.connect(de.address)
        # fragment the decode pool so granted blocks are not in order
        r0 = await pre.submit(link, "warm", 4 * 3)
        await r0.abort()
        await dec.next_request(1)
        reqs = []
        for i, tokens in enumerate((5, 13, 1)):
            rp = await pre.submit(link, f"r{i}", tokens)
            fill(pre, rp, i)
            reqs.append(rp)
        got = {}
        for _ in reqs:
            rd = await dec.next_request(2)
            got[rd.id] = rd
        for rp in reqs:
            rd = got[rp.id]
            assert rd.expected == rp.pages
            halves = 3 * (1 if link.ppb == 1 else 2)
            assert halves <= rp.pages <= halves * len(rp.blocks)
            for layer in range(3):
                rp.post(layer)
            await rp.written()
            await rd.wait(5)
            same(pre, dec, rp, rd)
            await rd.finish(b"ok:" + rd.id.encode())
            assert await rp.result(5) == b"ok:" + rp.id.encode()
        assert dec.pool.in_use == 0 and pre.pool.in_use == 0
        assert dec.tags.free == (1 << 20) - 1
    finally:
        await close(de, pe, dec, pre)


@pytest.mark.parametrize(
    "field,val",
    [("dtype", "float16"), ("kv_heads", 4), ("block_tokens", 8), ("layers", 2), ("head_dim", 16)],
)
async def test_layout_mismatch_names_field(field, val):
    de, pe, dec, pre = await pair(lay(), lay(**{field: val}))
    try:
        with pytest.raises(LayoutMismatch, match=field) as ei:
            await pre.connect(de.address)
        assert ei.value.field == field
        assert dec.refused and dec.refused[0].field == field
    finally:
        await close(de, pe, dec, pre)


async def test_out_of_blocks_is_typed_and_writes_nothing():
    de, pe, dec, pre = await pair(lay(blocks=4), lay(blocks=16))
    try:
        link = await pre.connect(de.address)
        with pytest.raises(OutOfBlocks) as ei:
            await pre.submit(link, "big", 4 * 5)
        assert ei.value.need == 5 and ei.value.free == 4
        assert dec.pool.in_use == 0 and pre.pool.in_use == 0
        assert dec.tags.free == (1 << 20) - 1
        r = await pre.submit(link, "fits", 16)  # the pool is intact
        await r.push()
        rd = await dec.next_request(2)
        await rd.wait(5)
        await rd.finish()
        await r.result(5)
    finally:
        await close(de, pe, dec, pre)


async def test_abort_mid_transfer_releases_both_sides():
    de, pe, dec, pre = await pair(lay(), lay())
    try:
        link = await pre.connect(de.address)
        rp = await pre.submit(link, "a", 30)
        rd = await dec.next_request(2)
        rp.post(0)  # one layer of three, then the decode side gives up
        await rp.written()
        waiter = asyncio.ensure_future(rd.wait())
        await asyncio.sleep(0.05)
        await rd.abort("client went away")
        with pytest.raises(RequestAborted, match="client went away"):
            await waiter
        with pytest.raises(RequestAborted):
            await rp.result(2)
        assert dec.pool.in_use == 0 and pre.pool.in_use == 0
        assert dec.engine.counter(rd.imm).count == 0  # drained: the tag is clean
        # the prefill side aborts this one
        rp = await pre.submit(link, "b", 30)
        rd = await dec.next_request(2)
        rp.post(range(0, 2))
        await rp.abort()
        with pytest.raises(RequestAborted):
            await rd.wait(2)
        for _ in range(100):
            if dec.pool.in_use == 0:
                break
            await asyncio.sleep(0.01)
        assert dec.pool.in_use == 0 and pre.pool.in_use == 0
        assert dec.engine.counter(rd.imm).count == 0
    finally:
        await close(de, pe, dec, pre)


async def test_prefix_hits_skip_written_blocks():
    de, pe, dec, pre = await pair(lay(), lay())
    try:
        link = await pre.connect(de.address)
        toks = np.arange(22)
        h = block_hashes(toks, 4)
        assert len(h) == 5
        rp = await pre.submit(link, "first", 22, prefix=h)
        fill(pre, rp, 1)
        await rp.push()
        rd = await dec.next_request(2)
        assert rd.hits == 0
        await rd.wait(5)
        await rd.finish()
        await rp.result(5)
        # same first 3 blocks, then different tokens
        toks2 = np.concatenate([toks[:12], np.arange(100, 110)])
        rp2 = await pre.submit(link, "second", 22, prefix=block_hashes(toks2, 4))
        rd2 = await dec.next_request(2)
        assert rp2.hits == rd2.hits == 3
        assert rd2.expected == rp2.pages
        assert list(rd2.blocks[:3]) == list(rd.blocks[:3])
        fill(pre, rp2, 2)
        await rp2.push()
        await rd2.wait(5)
        same(pre, dec, rp2, rd2, start=3)
        await rd2.finish()
        await rp2.result(5)
    finally:
        await close(de, pe, dec, pre)


async def test_runs_merge_only_blocks_adjacent_on_both_sides():
    from asyncfabric.kv.plan import expected_imms, runs

    a, b = lay(), lay()
    s = np.array([0, 1, 2, 5, 6, 7])
    d = np.array([3, 4, 9, 10, 11, 12])
    starts, lens = runs(a, b, 2, s, d)
    assert starts.tolist() == [0, 2, 3] and lens.tolist() == [2, 1, 3]
    half = a.half_bytes
    assert expected_imms(a, b, 2, s, d, chunk_bytes=1 << 20) == 3 * 2 * 3
    assert expected_imms(a, b, 2, s, d, chunk_bytes=half) == 3 * 2 * 6  # a chunk per page
    fi = lay(order="block_first")
    assert runs(fi, b, 2, s, d)[1].tolist() == [1] * 6  # K halves not adjacent there
    assert runs(fi, fi, 1, s, d)[1].tolist() == [2, 1, 3]
