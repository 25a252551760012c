"""all_reduce between two network namespaces over a tc-shaped tcp link (bench/shaped.py).

Each rank is its own process in its own namespace, the store in the switch namespace:
nothing crosses but the shaped veths. fp32 stays exact, int8 agrees on both ranks, and
the link really is the bound (a call takes at least its bytes' time at the rate).
Skipped, with the reason, where namespaces or tc are not available (not root...).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np
import pytest
import torch

from asyncfabric.backends.libfabric import LibfabricBackend
from asyncfabric.bench.shaped import ShapedLink, shaped_available

pytestmark = pytest.mark.skipif(
    "tcp" not in LibfabricBackend().providers(), reason="libfabric has no tcp provider here"
)

RATE = 200_000_000  # bit/s each way a port
N = 1 << 20  # fp32 values: 4 MiB, two-shot


def _rank(rank: int, ns: str, addr: str, url: str, secret: str, conn: Any) -> None:
    from asyncfabric.bench.shaped import enter

    enter(ns)

    async def main() -> dict[str, Any]:
        import asyncfabric as af
        from asyncfabric.collectives import all_reduce

        async with af.Engine("tcp", node=addr) as eng:
            store = await af.store.connect(url, secret=secret)
            g = await af.join(store, group="shaped", name=f"r{rank}", engine=eng, ttl=10)
            view = await g.wait_for(2, timeout=60)
            x = torch.randn(N, generator=torch.Generator().manual_seed(rank))
            exact, q = x.clone(), x.clone()
            await all_reduce(torch.ones(8), view, timeout=60)  # connect, register
            t0 = time.perf_counter()
            await all_reduce(exact, view, timeout=60)
            dt = time.perf_counter() - t0
            await all_reduce(q, view, quant="int8", timeout=60)
            await g.leave()
            await store.aclose()
            return {"exact": exact.numpy(), "int8": q.numpy(), "seconds": dt}

    try:
        conn.send(("ok", asyncio.run(main())))
    except BaseException as exc:
        conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))


def test_allreduce_over_a_shaped_link():
    reason = shaped_available()
    if reason is not None:
        pytest.skip(f"no shaped link here: {reason}")
    from asyncfabric.bench.allreduce import _store

    ctx = mp.get_context("spawn")
    with ShapedLink(2, RATE) as link, _store(link.switch_ns, link.switch_addr) as (url, secret):
        pipes, procs = [], []
        try:
            for r in range(2):
                a, b = ctx.Pipe()
                p = ctx.Process(target=_rank, args=(r, link.ns[r], link.addr[r], url, secret, b))
                p.start()
                pipes.append(a)
                procs.append(p)
            res = []
            for c in pipes:
                assert c.poll(120), "a rank did not finish within 120 s"
                res.append(c.recv())
            stats = link.qdisc_stats()
        finally:
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        names = (link.switch_ns, *link.ns)
    assert all(st == "ok" for st, _ in res), res
    listed = os.popen("ip netns list").read()
    assert not any(n in listed for n in names), "namespaces left behind"
    out = [v for _, v in res]
    xs = [torch.randn(N, generator=torch.Generator().manual_seed(r)).numpy() for r in range(2)]
    want = xs[0] + xs[1]
    for o in out:
        assert np.array_equal(o["exact"], want)
    assert np.array_equal(out[0]["int8"], out[1]["int8"])
    err = out[0]["int8"] - want
    rel = float(np.sqrt(np.mean(err**2) / np.mean(want**2)))
    assert 0 < rel < 0.02, rel
    # two-shot at 2 ranks: each rank sends half the tensor twice (reduce-scatter, then
    # all-gather); tbf lets its bucket through at once, the rest goes at the rate
    line = (4 * N - link.burst) * 8 / RATE
    assert out[0]["seconds"] >= 0.8 * line, (out[0]["seconds"], line, stats)
    assert all("Sent" in s for s in stats), stats


def test_parse_rate():
    from asyncfabric.bench.shaped import parse_rate

    assert parse_rate("10gbit") == 10_000_000_000
    assert parse_rate("2.5gbit") == 2_500_000_000
    assert parse_rate("800mbit") == 800_000_000
    assert parse_rate("100mbps") == 800_000_000  # tc: bps is bytes a second
    for bad in ("fast", "10", "5tbit", ""):
        with pytest.raises(ValueError):
            parse_rate(bad)
