"""Where an all-reduce's time goes, per rank: kernels, waits per phase, posting, draining.

python benchmarks/profile_allreduce.py --provider tcp --size 8M --quant int8 [--piece 131072]

Two spawned processes joined to one group (an embedded store); wraps the AllReduce's
kernel calls and waits with timers (perf_counter) and prints, per rank, the
share of the wall time each took. Timers add a few µs per call: compare runs,
not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time
from collections import defaultdict
from typing import Any


async def _main(rank: int, a: Any, d: str) -> None:
    import torch

    import asyncfabric as af
    from asyncfabric.collectives import AllReduce, allreduce

    acc: dict[str, float] = defaultdict(float)
    cnt: dict[str, int] = defaultdict(int)

    def timed(name: str, f: Any) -> Any:
        def w(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return f(*args)
            finally:
                acc[name] += time.perf_counter() - t
                cnt[name] += 1

        return w

    K = allreduce.K

    class TK:
        quantize = staticmethod(timed("k.quantize", K.quantize))
        dequantize = staticmethod(timed("k.dequantize", K.dequantize))
        convert = staticmethod(timed("k.convert", K.convert))
        reduce = staticmethod(timed("k.reduce", K.reduce))

    allreduce.K = TK  # type: ignore[assignment]
    kw = {"node": "127.0.0.1"} if a.provider == "tcp" else {}
    async with af.Engine(a.provider, **kw) as eng:
        store = await af.store.connect(d[0], secret=d[1])
        g = await af.join(store, group="profile", name=f"r{rank}", engine=eng, ttl=30)
        view = await g.wait_for(2, timeout=60)
        ar = AllReduce(view, piece_elems=a.piece)
        orig_wait, orig_post, orig_drain = ar._wait, ar._post, ar._drain_writes
        names = {0: "wait.header", 1: "wait.rs", 2: "wait.ag", 3: "wait.oneshot"}

        async def wait(phase: int, *x: Any) -> None:
            t = time.perf_counter()
            await orig_wait(phase, *x)
            acc[names[phase]] += time.perf_counter() - t
            cnt[names[phase]] += 1

        async def drain() -> None:
            t = time.perf_counter()
            await orig_drain()
            acc["drain"] += time.perf_counter() - t

        ar._wait = wait  # type: ignore[method-assign]
        ar._post = timed("post", orig_post)  # type: ignore[method-assign]
        ar._drain_writes = drain  # type: ignore[method-assign]
        x = torch.randn(a.size // 2).bfloat16()
        for _ in range(2):
            await ar(x, quant=a.quant)
        acc.clear()
        cnt.clear()
        await view.barrier()
        t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
        for _ in range(a.iters):
            await ar(x, quant=a.quant)
        wall = time.perf_counter() - t0
        cpu, main_cpu = time.process_time() - c0, time.thread_time() - m0
        await view.barrier()
        lines = [
            f"rank {rank}: {a.iters} x {a.size} B quant={a.quant}: {wall / a.iters * 1e3:.2f} ms each; "
            f"CPU {cpu / a.iters * 1e3:.2f} ms (Python thread {main_cpu / a.iters * 1e3:.2f})"
        ]
        for k in sorted(acc, key=lambda k: -acc[k]):
            lines.append(
                f"   {k:<14} {acc[k] / a.iters * 1e3:8.2f} ms {100 * acc[k] / wall:5.1f} %  ({cnt[k] // a.iters} calls)"
            )
        print("\n".join(lines), flush=True)
        ar.close()
        await g.leave()


def _run(rank: int, a: Any, d: str) -> None:
    asyncio.run(_main(rank, a, d))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--provider", default="tcp")
    p.add_argument("--size", default="8M")
    p.add_argument("--quant", default=None)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--piece", type=int, default=128 << 10)
    a = p.parse_args()
    a.quant = None if a.quant in (None, "None", "none") else a.quant
    s = a.size.upper()
    a.size = int(float(s[:-1]) * (1 << 20)) if s.endswith("M") else int(s)
    from asyncfabric.bench.allreduce import _store

    with _store() as d:
        ctx = mp.get_context("spawn")
        ps = [ctx.Process(target=_run, args=(r, a, d)) for r in range(2)]
        for x in ps:
            x.start()
        for x in ps:
            x.join()


if __name__ == "__main__":
    main()
