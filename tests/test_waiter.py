"""The fast path's own waiter (engine/_waiter.c): a future-like object that
asyncio's tasks, ``wait_for``, ``gather`` and ``shield`` take as they take a
Future, whose ends wake their tasks through one ``call_soon`` per burst.

Each test checks the behaviour an asyncio.Future has, on the Waiter; the last
ones check that ``Engine.write`` uses it on the base loop, and not when
``ASYNCFABRIC_NATIVE_WAITERS=0`` is set.
"""

from __future__ import annotations

import asyncio
import contextvars

import numpy as np
import pytest

import asyncfabric as af
from asyncfabric.engine import fastpath

pytestmark = pytest.mark.skipif(
    fastpath._native is None or not hasattr(fastpath._native, "Waiters"),
    reason="the fast path extension is not built",
)


def run(coro):
    return asyncio.run(coro)


async def _waiters():
    return fastpath._native.Waiters(asyncio.get_running_loop())


def test_is_a_future_for_asyncio():
    async def main():
        ws = await _waiters()
        w = ws.new()
        assert asyncio.isfuture(w)
        assert w.get_loop() is asyncio.get_running_loop()
        assert not w.done() and not w.cancelled()
        with pytest.raises(asyncio.InvalidStateError):
            w.result()
        asyncio.get_running_loop().call_soon(w.set_result, None)
        assert await w is None
        assert w.done() and w.result() is None and w.exception() is None
        assert await w is None  # awaiting a finished waiter returns at once
        with pytest.raises(asyncio.InvalidStateError):
            w.set_result(None)

    run(main())


def test_exception_reaches_the_awaiting_task():
    async def main():
        ws = await _waiters()
        w = ws.new()
        err = ValueError("the transfer failed")
        asyncio.get_running_loop().call_soon(w.set_exception, err)
        with pytest.raises(ValueError, match="the transfer failed"):
            await w
        assert w.exception() is err
        w2 = ws.new()
        w2.set_exception(KeyError)  # a class is instantiated, as Future does
        assert isinstance(w2.exception(), KeyError)
        with pytest.raises(TypeError):
            ws.new().set_exception(StopIteration())

    run(main())


def test_cancelling_the_task_cancels_the_waiter():
    async def main():
        ws = await _waiters()
        w = ws.new()
        t = asyncio.ensure_future(w)
        task = asyncio.create_task(_await(w))
        await asyncio.sleep(0)
        task.cancel("stop")
        with pytest.raises(asyncio.CancelledError):
            await task
        assert w.cancelled()
        with pytest.raises(asyncio.CancelledError):
            w.result()
        assert t is w  # ensure_future keeps a future-like object as it is
        assert not w.cancel()  # already ended

    run(main())


async def _await(w):
    return await w


def test_wait_for_times_out_and_cancels():
    async def main():
        ws = await _waiters()
        w = ws.new()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(w, 0.01)
        assert w.cancelled()
        w2 = ws.new()
        asyncio.get_running_loop().call_later(0.01, w2.set_result, None)
        assert await asyncio.wait_for(w2, 5) is None

    run(main())


def test_gather_and_shield():
    async def main():
        ws = await _waiters()
        a, b = ws.new(), ws.new()
        loop = asyncio.get_running_loop()
        loop.call_soon(b.set_result, None)
        loop.call_soon(a.set_result, None)
        assert await asyncio.gather(a, b) == [None, None]
        c = ws.new()
        outer = asyncio.ensure_future(asyncio.shield(c))
        await asyncio.sleep(0)
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        assert not c.done()  # shielded: still pending
        c.set_result(None)
        assert await c is None

    run(main())


def test_callbacks_run_in_their_context_once_and_in_one_flush():
    var = contextvars.ContextVar("var", default="none")

    async def main():
        ws = await _waiters()
        seen = []
        a, b = ws.new(), ws.new()
        ctx = contextvars.copy_context()
        ctx.run(var.set, "theirs")
        a.add_done_callback(lambda w: seen.append(("a", w, var.get())), context=ctx)
        a.add_done_callback(lambda w: seen.append(("a2", w, var.get())))
        drop = seen.append
        b.add_done_callback(drop)
        assert b.remove_done_callback(drop) == 1
        assert b.remove_done_callback(drop) == 0
        flushes = ws.flushes
        a.set_result(None)
        b.set_result(None)
        assert seen == []  # nothing runs synchronously
        await asyncio.sleep(0)
        assert seen == [("a", a, "theirs"), ("a2", a, "none")]
        assert ws.flushes == flushes + 1
        late = []
        a.add_done_callback(late.append)  # after the end: scheduled at once
        await asyncio.sleep(0)
        assert late == [a]

    run(main())


def test_a_failing_callback_goes_to_the_loop_handler():
    async def main():
        ws = await _waiters()
        loop = asyncio.get_running_loop()
        caught = []
        loop.set_exception_handler(lambda loop, ctx: caught.append(ctx))
        w = ws.new()
        after = []
        w.add_done_callback(lambda w: 1 / 0)
        w.add_done_callback(after.append)
        w.set_result(None)
        await asyncio.sleep(0)
        assert isinstance(caught[0]["exception"], ZeroDivisionError)
        assert after == [w]  # the others still run

    run(main())


def test_keyboard_interrupt_in_a_callback_stops_the_loop_and_loses_nothing():
    loop = asyncio.new_event_loop()
    try:
        ws = fastpath._native.Waiters(loop)
        w = ws.new()
        after = []

        def interrupt(_w):
            raise KeyboardInterrupt

        w.add_done_callback(interrupt)
        w.add_done_callback(after.append)
        w.set_result(None)
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(asyncio.sleep(0.01))
        assert after == []  # not yet: the flush stopped at the interrupt
        loop.run_until_complete(asyncio.sleep(0.01))
        assert after == [w]  # the rest ran at the next flush
    finally:
        loop.close()


async def _engine_write(n: int = 64 << 10):
    async with af.Engine("shm") as a, af.Engine("shm") as b:
        src = a.register(np.ones(n, np.uint8))
        dst = np.zeros(n, np.uint8)
        rd = b.register(dst)
        desc = rd.descriptor()
        await a.write(src, desc, imm=3)  # the first write to a destination: Python path
        calls = a._fp.waiters.calls if a._fp.waiters is not None else None
        await asyncio.gather(*(a.write(src, desc, imm=3) for _ in range(16)))
        await b.counter(3).wait(17, timeout=10)
        assert dst.all()
        after = a._fp.waiters.calls if a._fp.waiters is not None else None
        return calls, after


def test_engine_write_uses_it_on_the_base_loop():
    calls, after = run(_engine_write())
    assert calls is not None and after > calls


def test_engine_write_without_it(monkeypatch):
    monkeypatch.setenv("ASYNCFABRIC_NATIVE_WAITERS", "0")
    assert run(_engine_write()) == (None, None)
