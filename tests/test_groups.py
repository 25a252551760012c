"""Groups on real engines and real stores: every test runs on the embedded store and on
etcd (scripts/test.sh starts one), over shm and tcp."""

from __future__ import annotations

import asyncio
import os

import pytest

import asyncfabric as af
from asyncfabric.testing.groups import local_views

pytestmark = pytest.mark.anyio

T = 30.0  # generous bounds: two shared cores


@pytest.fixture
def anyio_backend():
    return "asyncio"  # groups are asyncio-only


def gname() -> str:
    return f"t-{os.urandom(4).hex()}"  # etcd is shared by the tests: one group each


async def next_event(it, timeout=T):
    return await asyncio.wait_for(it.__anext__(), timeout)


async def engines(n, provider, kw):
    return [await af.Engine.open(provider, **kw) for _ in range(n)]


async def test_join_members_events_leave(group_store, provider, kw):
    es = await engines(3, provider, kw)
    try:
        group = gname()
        a = await af.join(group_store, group=group, name="a", engine=es[0], meta={"role": "p"})
        evs = a.events()
        b = await af.join(group_store, group=group, name="b", engine=es[1], meta={"role": "d"})
        c = await af.join(group_store, group=group, name="c", engine=es[2])
        j1, j2 = await next_event(evs), await next_event(evs)
        assert isinstance(j1, af.Joined) and isinstance(j2, af.Joined)
        assert (j1.member.name, j2.member.name) == ("b", "c")
        assert j1.version < j2.version
        assert j1.member.meta == {"role": "d"} and j1.member.address == es[1].address
        assert sorted(a.members) == sorted(c.members) == ["a", "b", "c"]
        assert a.members["a"].meta == {"role": "p"} and a.members["b"].joined > 0
        await b.leave()
        left = await next_event(evs)
        assert left == af.Left("b", "left", left.version) and left.version > j2.version
        assert sorted(a.members) == ["a", "c"]
        with pytest.raises(af.UnknownMember, match="no live member 'b'"):
            a.member("b")
        await c.leave()
        assert (await next_event(evs)).name == "c"
        await a.leave()
        assert [e async for e in evs] == []  # ends when we leave
    finally:
        for e in es:
            e.close()


async def test_duplicate_name_refused(group_store, provider, kw):
    es = await engines(2, provider, kw)
    try:
        group = gname()
        async with await af.join(group_store, group=group, name="x", engine=es[0]) as g:
            with pytest.raises(af.DuplicateMember, match="already has a live member named 'x'"):
                await af.join(group_store, group=group, name="x", engine=es[1])
            assert list(g.members) == ["x"]
        # once it left, the name is free again
        async with await af.join(group_store, group=group, name="x", engine=es[1]) as g2:
            assert list(g2.members) == ["x"]
    finally:
        for e in es:
            e.close()


async def test_lease_expiry_reports_left_expired(group_store, provider, kw):
    es = await engines(2, provider, kw)
    try:
        group = gname()
        a = await af.join(group_store, group=group, name="a", engine=es[0], ttl=5)
        b = await af.join(group_store, group=group, name="b", engine=es[1], ttl=1)
        evs = a.events()
        # b stops renewing (as a hung or cut-off process would); its lease runs out
        b._main.cancel()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ev = await next_event(evs)
        assert ev == af.Left("b", "expired", ev.version)
        assert loop.time() - t0 < 1 + 1 + 1.5  # TTL + 1 s, plus slack for the store's tick
        b._left = True  # its handle is dead; nothing to leave
        await a.leave()
    finally:
        for e in es:
            e.close()


async def test_publish_lookup_revoke(group_store, provider, kw):
    es = await engines(2, provider, kw)
    try:
        group = gname()
        a = await af.join(group_store, group=group, name="a", engine=es[0])
        b = await af.join(group_store, group=group, name="b", engine=es[1])
        dst = bytearray(4096)
        region = es[1].register(dst)
        # a lookup may wait for the publication to appear
        pending = asyncio.ensure_future(a.lookup("b", "kv/layer0", timeout=T))
        await asyncio.sleep(0.05)
        await b.publish("kv/layer0", region.descriptor())
        desc = await pending
        assert bytes(desc) == bytes(region.descriptor())
        src = es[0].register(bytearray(b"z" * 4096))
        await es[0].write(src[:], desc[:], imm=7)
        await es[1].counter(7).wait(desc.expected_imms(), timeout=T)
        assert dst == b"z" * 4096
        with pytest.raises(af.LookupTimeout, match="did not publish 'nope'"):
            await a.lookup("b", "nope", timeout=0.2)
        with pytest.raises(af.LookupTimeout, match="not a member"):
            await a.lookup("ghost", "kv/layer0", timeout=0.2)
        # closing the region revokes its publication: never handed out as live again
        region.close()
        await b.flush()
        with pytest.raises(af.DescriptorRevoked, match="revoked 'kv/layer0'"):
            await a.lookup("b", "kv/layer0", timeout=T)
        # publishing again makes it live again
        r2 = es[1].register(bytearray(64))
        await b.publish("kv/layer0", r2.descriptor())
        assert (await a.lookup("b", "kv/layer0")).nbytes == 64
        # leaving revokes everything the member published
        evs = a.events()
        await b.leave()
        assert (await next_event(evs)).name == "b"
        with pytest.raises(af.DescriptorRevoked, match="left group"):
            await a.lookup("b", "kv/layer0", timeout=T)
        with pytest.raises(TypeError, match="takes a Descriptor"):
            await a.publish("k", b"not a descriptor")
        with pytest.raises(ValueError, match="descriptor name"):
            await a.publish("", src.descriptor())
        await a.leave()
    finally:
        for e in es:
            e.close()


async def test_view_ranks_barrier_allgather_and_member_lost(group_store, provider, kw):
    es = await engines(3, provider, kw)
    try:
        group = gname()
        gs = [
            await af.join(group_store, group=group, name=n, engine=e)
            for n, e in zip(["c", "a", "b"], es)
        ]
        views = await asyncio.gather(*(g.wait_for(3, timeout=T) for g in gs))
        for g, v in zip(gs, views):
            assert v.names == ("a", "b", "c") and v.size == 3
            assert v.rank == v.names.index(g.name) and v.engine is g.engine
            assert [m.name for m in v.members] == ["a", "b", "c"]
        assert len({v.id for v in views}) == 1
        for _ in range(5):
            await asyncio.gather(*(v.barrier(timeout=T) for v in views))
        got = await asyncio.gather(*(v.allgather(f"r{v.rank}".encode(), timeout=T) for v in views))
        assert got == [[b"r0", b"r1", b"r2"]] * 3
        got = await asyncio.gather(*(v.allgather(bytes([v.rank]), timeout=T) for v in views))
        assert got == [[b"\0", b"\1", b"\2"]] * 3
        # one-sided writes to a rank through view.peer / the member's address
        v0 = next(v for v in views if v.rank == 0)
        assert v0.peer(1) is v0.peer(1)
        with pytest.raises(ValueError, match="rank must be"):
            v0.peer(3)
        # a barrier that can never complete fails with MemberLost when a member leaves
        va = views[1]  # member "a"
        pending = [asyncio.ensure_future(va.barrier(timeout=T))]
        pending.append(asyncio.ensure_future(va.guard(asyncio.sleep(3600))))
        await asyncio.sleep(0.1)
        # ...but one already under way that finishes within the grace a member that left on
        # purpose gets (its last writes may still be uncounted here), finishes
        late = asyncio.ensure_future(va.guard(asyncio.sleep(0.15, result="done")))
        await gs[0].leave()  # "c"
        for p in pending:
            with pytest.raises(af.MemberLost, match="'c'") as info:
                await asyncio.wait_for(p, T)
            assert info.value.name == "c"
        assert await asyncio.wait_for(late, T) == "done"
        with pytest.raises(af.MemberLost):
            await va.barrier()  # the view stays failed
        with pytest.raises(af.ViewTimeout, match="has 2 of the 3"):
            await gs[1].wait_for(3, timeout=0.3)
        # of 2 members, a view of 1 holds the first to join ("a"): "b" is not in it
        with pytest.raises(af.ViewTimeout, match="'b' is not among the first 1"):
            await gs[2].wait_for(1, timeout=0.3)
        for g in gs[1:]:
            await g.leave()
    finally:
        for e in es:
            e.close()


async def test_local_views_helper(provider):
    async with local_views(3, provider=provider) as views:  # its own embedded store
        assert [v.rank for v in views] == [0, 1, 2]
        await asyncio.gather(*(v.barrier(timeout=T) for v in views))


async def test_local_views_on_a_given_store(group_store, provider):
    async with local_views(3, provider=provider, store=group_store) as views:
        assert [v.rank for v in views] == [0, 1, 2]
        await asyncio.gather(*(v.barrier(timeout=T) for v in views))
        r = views[2].engine.register(bytearray(16))
        descs = await asyncio.gather(
            *(v.allgather(bytes(r.descriptor()) if v.rank == 2 else b"", timeout=T) for v in views)
        )
        d = af.Descriptor.from_bytes(descs[0][2])
        await views[0].engine.write(views[0].engine.register(bytearray(b"q" * 16))[:], d[:], imm=9)
        await views[2].engine.counter(9).wait(1, timeout=T)
        assert bytes(r.buffer) == b"q" * 16


async def test_join_without_store_starts_embedded(provider, kw):
    es = await engines(2, provider, kw)
    try:
        async with await af.join(group="solo", name="a", engine=es[0]) as a:
            async with await af.join(group="solo", name="b", engine=es[1]) as b:
                assert sorted(a.members) == ["a", "b"] == sorted(b.members)
                assert a.store.url.startswith("af://127.0.0.1:")
    finally:
        for e in es:
            e.close()


async def test_bad_arguments(provider, kw):
    async with af.Engine(provider, **kw) as eng:
        srv = await af.store.serve("127.0.0.1:0", secret=b"0123456789")
        try:
            with pytest.raises(ValueError, match="name must be"):
                await af.join(srv, group="g", name="a/b", engine=eng)
            with pytest.raises(ValueError, match="ttl must be"):
                await af.join(srv, group="g", name="a", engine=eng, ttl=0)
            with pytest.raises(TypeError, match="JSON"):
                await af.join(srv, group="g", name="a", engine=eng, meta={"x": object()})
            with pytest.raises(TypeError, match="engine must be"):
                await af.join(srv, group="g", name="a", engine="eng")
            with pytest.raises(ValueError, match="unknown store scheme"):
                await af.store.connect("redis://x:1")
            with pytest.raises(af.StoreUnavailable, match="cannot reach"):
                await af.store.connect("af://127.0.0.1:1", secret=b"0123456789")
        finally:
            await srv.aclose()


async def test_wrong_secret_refused_in_process():
    srv = await af.store.serve("127.0.0.1:0", secret=b"right-secret-0123")
    try:
        with pytest.raises(af.StoreAuthError, match="different secret"):
            await af.store.connect(srv.url, secret=b"wrong-secret-0123")
        with pytest.raises(af.StoreAuthError, match="needs a shared secret"):
            await af.store.connect(srv.url, secret=None)
        assert srv.auth_failures == 1
        good = await af.store.connect(srv.url, secret=b"right-secret-0123")
        assert await good.list("") == ([], (await good.list(""))[1])  # nothing was written
        await good.aclose()
    finally:
        await srv.aclose()


async def test_region_on_close_and_region_of(provider, kw):
    calls = []
    async with af.Engine(provider, **kw) as eng, af.Engine(provider, **kw) as other:
        r1 = eng.register(bytearray(64))
        r2 = eng.register(bytearray(64))
        d1 = r1.descriptor()
        assert eng.region_of(d1) is r1
        assert other.region_of(d1) is None  # another engine's descriptor
        r1.on_close(lambda r: calls.append(("r1", r)))
        r2.on_close(lambda r: calls.append(("r2", r)))
        r1.close()
        r1.close()  # once only
        assert calls == [("r1", r1)]
        assert eng.region_of(d1) is None  # closed: not live
        with pytest.raises(TypeError, match="callable"):
            r2.on_close("nope")
    # closing the engine closes r2, and runs its callback
    assert calls == [("r1", r1), ("r2", r2)]
    # a callback added after close runs at once
    r1.on_close(lambda r: calls.append(("late", r)))
    assert calls[-1] == ("late", r1)


def test_groups_refuse_trio():
    trio = pytest.importorskip("trio")

    async def main():
        with pytest.raises(RuntimeError, match="asyncio-only"):
            await af.join(group="g", name="a", engine=None)

    trio.run(main)
