"""Dynamic scaling through a group: decode members join, leave and die while a steady
stream of requests is served. Real processes, real store, real engines (shm)."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time

import pytest

import asyncfabric as af
from asyncfabric.kv import KVPrefill, RequestFailed, Router
from asyncfabric.testing import kv_model as km

pytestmark = pytest.mark.asyncio
BOUND_S = 3.0  # failure bound: probe every 0.2 s; a dead local process fails a probe at once


async def test_add_remove_and_kill_decode_members_while_serving():
    secret = os.urandom(16).hex()
    srv = await af.store.serve("127.0.0.1:0", secret=secret)
    group = f"decode-{os.urandom(3).hex()}"
    ctx = mp.get_context("spawn")
    procs: dict[str, tuple] = {}
    loop = asyncio.get_running_loop()

    async def start(name):
        here, there = ctx.Pipe()
        p = ctx.Process(target=km.decode_member_process,
                        args=(there, srv.url, secret, group, name, 0.1))  # fmt: skip
        p.start()
        procs[name] = (p, here)
        assert await loop.run_in_executor(None, here.recv) == "joined"

    async def routed_to(router, name, present=True, timeout=10.0):
        end = loop.time() + timeout
        while (name in router.members) != present:
            assert loop.time() < end, f"router members {router.members}: {name} {present}"
            router.changed.clear()
            try:
                await asyncio.wait_for(router.changed.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    results: list[tuple[str, float, float, object]] = []  # member, submitted, ended, outcome
    try:
        async with af.Engine("shm") as eng:
            async with KVPrefill(eng, km.kv_layout(1024)) as pre:
                g = await af.join(srv, group=group, name="prefill-0", engine=eng,
                                  meta={"role": "prefill"})  # fmt: skip
                router = Router(g, pre)
                await start("d0")
                await start("d1")
                await router.start()
                await routed_to(router, "d0")
                await routed_to(router, "d1")
                stop = asyncio.Event()
                count = 0

                async def one(i):
                    t0 = time.monotonic()
                    rr = await router.submit(f"q{i}", 40)
                    try:  # the member may die between the grant and the push
                        await rr.request.push()
                        out = await rr.result(30)
                        assert out == rr.member.encode()
                    except RequestFailed as exc:
                        out = exc
                    results.append((rr.member, t0, time.monotonic(), out))

                async def stream():
                    nonlocal count
                    tasks = []
                    while not stop.is_set():
                        tasks.append(asyncio.ensure_future(one(count)))
                        count += 1
                        await asyncio.sleep(0.02)
                    await asyncio.gather(*tasks)

                s = asyncio.ensure_future(stream())
                await asyncio.sleep(1.0)
                await start("d2")  # a member joins while serving
                await routed_to(router, "d2")
                await asyncio.sleep(1.0)
                assert any(m == "d2" for m, *_ in results), "the new member got no request"

                p0, c0 = procs["d0"]  # a member leaves gracefully
                c0.send("leave")
                msg = await loop.run_in_executor(None, c0.recv)
                assert msg[0] == "left" and msg[2] == 0, msg  # drained: no block held
                t_left = time.monotonic()
                await routed_to(router, "d0", present=False)
                await asyncio.sleep(0.5)

                p1, _ = procs["d1"]  # a member dies, holding requests
                while router._inflight.get("d1", 0) < 2:
                    await asyncio.sleep(0.005)
                os.kill(p1.pid, signal.SIGKILL)
                t_kill = time.monotonic()
                await routed_to(router, "d1", present=False, timeout=BOUND_S)
                t_gone = time.monotonic()
                await asyncio.sleep(1.0)
                stop.set()
                await s
                await router.aclose()
                await g.leave()
    finally:
        for p, _c in procs.values():
            if p.is_alive():
                p.kill()
            p.join(5)
        await srv.aclose()

    failed = [(m, t0, t1, o) for m, t0, t1, o in results if isinstance(o, BaseException)]
    assert all(m == "d1" for m, *_ in failed), f"requests on live members failed: {failed}"
    assert failed, "no request was in flight on the killed member: the test proved nothing"
    for _m, t0, t1, o in failed:
        assert t1 - max(t0, t_kill) < BOUND_S, f"failed after {t1 - t_kill:.2f} s: {o}"
        assert "d1" in str(o) or "died" in str(o)
    assert t_gone - t_kill < BOUND_S
    # nothing went to d1 after the router dropped it, nor to d0 after it left
    assert not [r for r in results if r[0] == "d1" and r[1] > t_gone]
    assert not [r for r in results if r[0] == "d0" and r[1] > t_left]
    ok = [r for r in results if not isinstance(r[3], BaseException)]
    assert len(ok) > 50 and {r[0] for r in ok} == {"d0", "d1", "d2"}
