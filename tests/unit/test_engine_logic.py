"""Engine logic on the loopback transport: writes, counting, paged, send/recv, failures."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

import asyncfabric as af
from asyncfabric.transport import status

pytestmark = pytest.mark.anyio


async def _pair(**kw):
    a = await af.Engine.open("loopback", **kw)
    b = await af.Engine.open("loopback", **kw)
    return a, b


async def test_write_counts_by_the_rule(lb):
    a, b = await _pair(chunk_bytes=4096)
    try:
        dst = np.zeros(1 << 16, np.uint8)
        src = np.random.default_rng(1).integers(0, 256, 1 << 16, dtype=np.uint8)
        with a.register(dst) as rd, b.register(src) as rs:
            desc = af.Descriptor.from_bytes(bytes(rd.descriptor()))
            for n in (0, 1, 4095, 4096, 4097, 1 << 16):
                if n == 0:
                    await b.write_imm(desc, 9)
                else:
                    await b.write(rs[:n], desc[:n], imm=9)
                want = desc.expected_imms(n)
                assert want == af.expected_imms(n, chunk_bytes=4096)
                assert a.counter(9).count == want
                await a.counter(9).wait(want, timeout=1)
                assert a.counter(9).count == 0
            assert (dst == src).all()
    finally:
        a.close()
        b.close()


async def test_paged_and_messages(lb):
    a, b = await _pair()
    try:
        dst = np.zeros(10 * 4096, np.uint8)
        src = np.arange(4 * 4096, dtype=np.uint32).view(np.uint8)[: 4 * 4096].copy()
        with a.register(dst) as rd, b.register(src) as rs:
            n = await b.write_paged(rs, rd.descriptor(), [3, 0], [1, 7], page_size=4096, imm=4)
            assert n == 2
            await a.counter(4).wait(2, timeout=1)
            assert (dst[4096:8192] == src[3 * 4096 :]).all()
            assert (dst[7 * 4096 : 8 * 4096] == src[:4096]).all()
        await b.send(a.address, b"ping")
        assert await a.recv(timeout=1) == b"ping"
        with pytest.raises(af.ImmTimeout):
            await a.recv(timeout=0.05)
    finally:
        a.close()
        b.close()


async def test_region_outlives_its_close_while_in_flight():
    from asyncfabric.testing import loopback

    with loopback.installed("event"):
        a, b = await _pair()
        try:
            dst, src = np.zeros(64, np.uint8), np.ones(64, np.uint8)
            rd, rs = a.register(dst), b.register(src)
            t = b.transport
            t.hold()
            done = anyio.Event()

            async def w() -> None:
                await b.write(rs, rd.descriptor(), imm=1)
                done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(w)
                await anyio.sleep(0.01)
                rs.close()  # in flight: the registration must stay until it ends
                assert rs.registration.keys[0] in t._mrs
                t.release_held()
                with anyio.fail_after(2):
                    await done.wait()
            assert rs.registration.keys[0] not in t._mrs
        finally:
            a.close()
            b.close()


async def test_ends_that_only_drain_finds_still_end():
    """A transport whose drain() polls its completion queue (the pyverbs backend):
    pending_events() does not count those ends, and the engine must call drain() when
    its notify fd rings all the same (a CI hang of 2026-12-07 in the SoftRoCE guest)."""
    from asyncfabric.testing import loopback

    with loopback.installed("polled"):
        a, b = await _pair()
        try:
            dst, src = np.zeros(1 << 12, np.uint8), np.ones(1 << 12, np.uint8)
            rd, rs = a.register(dst), b.register(src)
            desc = rd.descriptor()
            with anyio.fail_after(2):
                for _ in range(3):
                    await b.write(rs, desc, imm=1)
                await a.counter(1).wait(3 * desc.expected_imms(len(src)))
            assert (dst == src).all() and not b._ops
        finally:
            a.close()
            b.close()


@pytest.mark.parametrize(
    "st,exc",
    [
        (status.ACCESS_DENIED, af.RemoteAccessError),
        (status.PEER_EXITED, af.PeerUnreachable),
        (status.PEER_TIMEOUT, af.PeerUnreachable),
        (status.IO_ERROR, af.PeerUnreachable),
        (-22, af.TransferError),
    ],
)
async def test_status_becomes_typed_error(lb, st, exc):
    a, b = await _pair()
    try:
        with a.register(np.zeros(64, np.uint8)) as rd, b.register(np.ones(64, np.uint8)) as rs:
            b.transport.fail_next(st)
            with pytest.raises(exc):
                await b.write(rs, rd.descriptor(), imm=2)
    finally:
        a.close()
        b.close()


async def test_write_into_closed_region_is_refused(lb):
    a, b = await _pair()
    try:
        rd = a.register(np.zeros(64, np.uint8))
        desc = af.Descriptor.from_bytes(bytes(rd.descriptor()))
        rd.close()
        with b.register(np.ones(64, np.uint8)) as rs, pytest.raises(af.RemoteAccessError):
            await b.write(rs, desc)
    finally:
        a.close()
        b.close()


async def test_fatal_error_fails_everything_pending(lb):
    """A transport's Fatal event fails every dependent future at once, with its cause
    (before this redesign the engine stored it and never read it: waiters timed out)."""
    a, b = await _pair()
    try:
        b.transport.hold()
        cause = af.TransferError("the completion queue of domain 0 broke (test)", 5)
        got: dict[str, BaseException] = {}
        with a.register(np.zeros(64, np.uint8)) as rd, b.register(np.ones(64, np.uint8)) as rs:
            desc = rd.descriptor()

            async def catch(name, coro) -> None:
                try:
                    await coro
                except BaseException as exc:
                    got[name] = exc

            with anyio.fail_after(2):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(catch, "write", b.write(rs, desc, imm=1))
                    tg.start_soon(catch, "wait", b.counter(77).wait(1, timeout=30))
                    tg.start_soon(catch, "recv", b.recv(timeout=30))
                    await anyio.sleep(0.02)
                    b.transport.fatal(cause)
            assert set(got) == {"write", "wait", "recv"}
            assert all(e is cause for e in got.values())
            with pytest.raises(af.TransferError, match="failed earlier"):
                await b.write(rs, desc)
    finally:
        a.close()
        b.close()


async def test_dead_peer_fails_writes(lb):
    a, b = await _pair()
    try:
        with a.register(np.zeros(64, np.uint8)) as rd, b.register(np.ones(64, np.uint8)) as rs:
            desc = rd.descriptor()
            await b.write(rs, desc)
            b.transport.kill_peer(b.connect(desc).id)
            with pytest.raises(af.PeerUnreachable):
                await b.write(rs, desc)
    finally:
        a.close()
        b.close()


async def test_counter_waiters_fifo_and_cancel(lb):
    a, b = await _pair()
    try:
        with a.register(np.zeros(64, np.uint8)) as rd:
            desc = rd.descriptor()
            order: list[int] = []
            c = a.counter(5)

            async def waiter(i: int, n: int) -> None:
                await c.wait(n, timeout=2)
                order.append(i)

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter, 1, 2)
                await anyio.sleep(0.01)
                tg.start_soon(waiter, 2, 1)
                await anyio.sleep(0.01)
                await b.write_imm(desc, 5)
                await anyio.sleep(0.02)
                assert order == []  # first come, first served: 2 does not jump ahead of 1
                for _ in range(2):
                    await b.write_imm(desc, 5)
            assert sorted(order) == [1, 2]
            assert c.count == 0
            with pytest.raises(af.ImmTimeout):
                await c.wait(1, timeout=0.02)
            await b.write_imm(desc, 5)
            await c.wait(1, timeout=1)  # the timed-out wait consumed nothing
    finally:
        a.close()
        b.close()


async def test_triggers_unsupported_where_the_transport_has_none(lb):
    """The contract's defaults refuse triggers and release words, naming what has them,
    and arm nothing (the engine keeps no state for them)."""
    a, b = await _pair()
    try:
        with a.register(np.zeros(64, np.uint8)) as rd, b.register(np.ones(64, np.uint8)) as rs:
            desc = af.Descriptor.from_bytes(bytes(rd.descriptor()))
            with pytest.raises(af.Unsupported, match="no triggered writes"):
                b.arm_write(rs, desc, af.Flag(), 1, imm=3)
            with pytest.raises(af.Unsupported, match="no counter release words"):
                a.counter(3).release_word(1, af.Flag(), 1)
            assert b.stats()["pending_ops"] == 0
            await b.write(rs, desc, imm=3)  # both engines go on as before
            await a.counter(3).wait(1, timeout=1)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("how", ["write", "paged", "send"])
async def test_a_post_that_raises_leaves_no_event_behind(lb, how):
    """A post that raises may have queued other transfers' ends on the way without a
    ring (on shm: its progress found the peer dead and failed every transfer to it).
    Their waiters must learn of it now, not at their timeouts (CI, 2026-12-07: three
    reads of a killed peer hung 15 s because the read that saw the death raised)."""
    a, b = await _pair()
    try:
        with a.register(np.zeros(8192, np.uint8)) as rd, b.register(np.ones(8192, np.uint8)) as rs:
            desc = rd.descriptor()
            b.transport.hold()
            got: list[str] = []

            async def first() -> None:
                await b.write(rs[:64], desc[:64], imm=1)
                got.append("done")

            with anyio.fail_after(2):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(first)
                    await anyio.sleep(0.02)
                    assert not got
                    cause = af.PeerUnreachable("the peer's process has exited (test)")
                    b.transport.raise_next(cause)
                    with pytest.raises(af.PeerUnreachable) as info:
                        if how == "write":
                            await b.write(rs[64:128], desc[64:128])
                        elif how == "paged":
                            await b.write_paged(rs, desc, [0], [1], page_size=4096)
                        else:
                            await b.send(a.address, b"x")
                    assert info.value is cause
            assert got == ["done"]
    finally:
        a.close()
        b.close()
