"""ImmCounter semantics, with two engines in one process (real transport, no mocks)."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

import asyncfabric as af

pytestmark = pytest.mark.anyio


@pytest.fixture
async def pair(provider, kw):
    async with af.Engine(provider, **kw) as a, af.Engine(provider, **kw) as b:
        buf = np.zeros(4096, np.uint8)
        with b.register(buf) as region:
            yield a, b, region.descriptor()


async def test_arrivals_before_wait_are_counted(pair):
    a, b, desc = pair
    for _ in range(5):
        await a.write_imm(desc, 1)
    with anyio.fail_after(5):
        while b.counter(1).count < 5:
            await anyio.sleep(0.001)
    await b.counter(1).wait(5, timeout=1)
    assert b.counter(1).count == 0


async def test_surplus_carries_over(pair):
    a, b, desc = pair
    for _ in range(7):
        await a.write_imm(desc, 2)
    await b.counter(2).wait(3, timeout=5)
    await b.counter(2).wait(4, timeout=5)
    assert b.counter(2).count == 0


async def test_waiters_are_served_in_order(pair):
    """First come, first served: a later, smaller wait does not overtake the head."""
    a, b, desc = pair
    done: list[int] = []

    async def waiter(i: int, n: int) -> None:
        await b.counter(3).wait(n, timeout=10)
        done.append(i)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, 0, 2)
        await anyio.sleep(0.01)
        tg.start_soon(waiter, 1, 1)
        await anyio.sleep(0.01)
        await a.write_imm(desc, 3)
        with anyio.fail_after(5):
            while b.counter(3).count < 1:
                await anyio.sleep(0.001)
        await anyio.sleep(0.02)
        assert done == []  # one arrived: the head wants two, and the second waits behind it
        await a.write_imm(desc, 3)
        await a.write_imm(desc, 3)
    assert sorted(done) == [0, 1]
    assert b.counter(3).count == 0


async def test_cancelled_wait_leaks_nothing(pair):
    a, b, desc = pair
    c = b.counter(4)
    with anyio.move_on_after(0.05):
        await c.wait(10)
    for _ in range(2):
        await a.write_imm(desc, 4)
    # the cancelled waiter consumed nothing and left no arm behind
    await c.wait(2, timeout=5)
    assert c.count == 0
    assert not c._waiters


async def test_timeout_says_what_arrived(pair):
    a, b, desc = pair
    await a.write_imm(desc, 5)
    with pytest.raises(af.ImmTimeout, match="1 of 3"):
        await b.counter(5).wait(3, timeout=0.2)
    with pytest.raises(TimeoutError):  # ImmTimeout is a TimeoutError
        await b.counter(5).wait(3, timeout=0.05)
    await a.write_imm(desc, 5)
    await a.write_imm(desc, 5)
    await b.counter(5).wait(3, timeout=5)


async def test_ten_thousand_counters(pair):
    a, b, desc = pair
    vals = list(range(20000, 30000))
    for v in vals:
        await a.write_imm(desc, v)
    for v in vals[::-1]:
        await b.counter(v).wait(1, timeout=10)
    assert b.stats()["live_counters"] == 0


def test_expected_imms_rule():
    assert af.expected_imms(0, chunk_bytes=1024) == 1
    assert af.expected_imms(1, chunk_bytes=1024) == 1
    assert af.expected_imms(1024, chunk_bytes=1024) == 1
    assert af.expected_imms(1025, chunk_bytes=1024) == 2
    assert af.expected_imms(pages=300) == 300
    with pytest.raises(ValueError):
        af.expected_imms(5)
