"""Measure the progress policies side by side: latency, bandwidth, and CPU burned while idle.

    .venv/bin/python benchmarks/progress_policy.py [--provider shm] [--pings 2000]

Two processes on loopback. For each policy: WriteImm ping-pong round trip (p50/p99), the
throughput of a stream of 1 MiB writes, and the CPU seconds both processes use during 1 s
with nothing to do. The results feed docs/progress.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import anyio
import numpy as np

import asyncfabric as af
from asyncfabric.testing.peer import PeerProcess

POLICIES = {
    "default": af.ProgressPolicy(),
    "no-wait-spin": af.ProgressPolicy(wait_spin_us=0),
    "latency": af.ProgressPolicy.latency(),
    "low_cpu": af.ProgressPolicy.low_cpu(),
}


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


async def measure(provider: str, name: str, policy: af.ProgressPolicy, pings: int) -> dict:
    kw = {"node": "127.0.0.1"} if provider == "tcp" else {}
    async with (
        PeerProcess(provider, progress=policy, **kw) as peer,
        af.Engine(provider, progress=policy, **kw) as eng,
    ):
        box = np.zeros(64, np.uint8)
        with eng.register(box) as mine:
            _, peer_desc_b = await peer.alloc(1 << 20)
            remote = af.Descriptor.from_bytes(peer_desc_b)
            await peer.call("echo", bytes(mine.descriptor()), 1, 2, pings + 100)
            pong = eng.counter(2)
            rtts = []
            for i in range(pings + 100):
                t0 = time.perf_counter()
                await eng.write_imm(remote, 1)
                await pong.wait(1, timeout=30)
                if i >= 100:
                    rtts.append((time.perf_counter() - t0) * 1e6)
            await peer._reply(30)
            src = np.ones(1 << 20, np.uint8)
            with eng.register(src) as region:
                n = 256
                t0 = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for _ in range(n):
                        tg.start_soon(lambda: eng.write(region, remote, imm=3))
                await peer.wait(3, n)
                gbps = n * (1 << 20) / (time.perf_counter() - t0) / 1e9
            await anyio.sleep(0.2)
            c0, p0 = _cpu(), await peer.call("cpu")
            await anyio.sleep(1.0)
            idle = (_cpu() - c0) + (await peer.call("cpu") - p0)
    rtts.sort()
    return {
        "policy": name,
        "rtt_p50_us": statistics.median(rtts),
        "rtt_p99_us": rtts[int(len(rtts) * 0.99)],
        "gbps_1mib": gbps,
        "idle_cpu_s_per_s": idle,
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--pings", type=int, default=2000)
    a = ap.parse_args()
    print(
        f"| policy | RTT p50 (us) | RTT p99 (us) | 1 MiB stream (GB/s) | idle CPU (cores) |  provider {a.provider}"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, pol in POLICIES.items():
        r = await measure(a.provider, name, pol, a.pings)
        print(
            f"| {name} | {r['rtt_p50_us']:.1f} | {r['rtt_p99_us']:.1f} | {r['gbps_1mib']:.2f} | {r['idle_cpu_s_per_s']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    anyio.run(main)
