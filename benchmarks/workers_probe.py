"""Where one engine pair with D domains and D workers spends its time at 64 KiB.

A diagnosis companion to `asyncfabric bench workers`: the same stream (write_many of
batches of writes cycling through 8 slots, one immediate each), then both engines'
native counters for the run: how often and how long threads waited for the engine lock
(lock_waits, lock_wait_ns), EAGAINs, posts, naps (blocks) and wake-ups. Run it beside
`benchmarks/thread_cpu.py` to see which threads are busy.

Usage: python3 benchmarks/workers_probe.py [--domains 1,2,4] [--size 65536] [--seconds 3]
[--slots 8] (writes cycle through this many distinct slots of the source and target)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import numpy as np

import asyncfabric as af
from asyncfabric.testing.peer import PeerProcess

BATCH = 4096
KEYS = ("posts", "worker_posts", "completions", "imms", "eagain", "blocks", "wakeups",
        "spins", "lock_waits", "lock_wait_ns")  # fmt: skip


def _delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a[k] for k in KEYS}


def _cpus(d: int) -> tuple[list[int] | None, list[int] | None]:
    n = os.cpu_count() or 1
    if d <= 1 or n < 2 + 2 * d:
        return None, None
    return list(range(2, 2 + d)), list(range(2 + d, 2 + 2 * d))


async def one(d: int, size: int, seconds: float, slots: int) -> None:
    tx, rx = _cpus(d)
    kw = {"domains": d, "workers": d}
    async with (
        PeerProcess("shm", **kw, **({"cpus": rx} if rx else {})) as peer,
        af.Engine("shm", **kw, **({"cpus": tx} if tx else {})) as eng,
    ):
        rid, db = await peer.alloc(slots * size)
        desc = af.Descriptor.from_bytes(db)
        src = eng.register(np.ones(slots * size, np.uint8))
        offs = (np.arange(BATCH, dtype=np.uint64) % slots) * np.uint64(size)
        batch = af.Batch().add_many(src, desc, offs, offs, size, imm=1)
        await eng.write_many(batch)  # warm up: first contact, pages touched
        await peer.wait(1, BATCH)
        s0, r0 = eng.stats(), await peer.call("stats")
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < seconds:
            await eng.write_many(batch)
            n += 1
        dt = time.perf_counter() - t0
        s1, r1 = eng.stats(), await peer.call("stats")
        await peer.wait(1, n * BATCH, timeout=60)
        writes = n * BATCH
        print(f"D={d} size={size} slots={slots} writes={writes} {writes * size / dt / 1e9:.2f} GB/s "
              f"{writes / dt / 1e3:.0f} K writes/s")  # fmt: skip
        for who, a, b in (("sender", s0, s1), ("receiver", r0, r1)):
            dd = _delta(a, b)
            per = {k: round(v / writes, 3) for k, v in dd.items() if k != "lock_wait_ns"}
            wait_ms = dd["lock_wait_ns"] / 1e6
            print(f"  {who}: lock wait {wait_ms:.1f} ms of {dt * 1e3:.0f} ms "
                  f"({dd['lock_wait_ns'] / max(dd['lock_waits'], 1):.0f} ns each); per write {per}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", default="1,2,4")
    ap.add_argument("--size", type=int, default=65536)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--slots", type=int, default=8)
    a = ap.parse_args()
    print(f"sender copy: {os.environ.get('ASYNCFABRIC_SHM_SENDER_COPY', 'off')}")
    for d in (int(x) for x in a.domains.split(",")):
        asyncio.run(one(d, a.size, a.seconds, a.slots))


if __name__ == "__main__":
    main()
