"""The host side of a triggered write, on CPU: what the watcher adds to a small write.

One process, two shm engines (``ProgressPolicy.latency()``, the watcher spinning). Each
round stores 1 into a flag an 8 B write is armed on (repeating, reset to 0), and spins
until the peer's release word (repeating, on the write's immediate) holds 1: flag ->
watcher -> post -> the peer counts -> release store. Beside it, the same 8 B write
posted from Python (``await eng.write``, the fast path) -> release store. The Python
spinner stands in for a CUDA stream (``cuStreamWaitValue32``); on the GPU machine use
``benchmarks/gpu_triggers.py``.

    flock /work/notes/bench.lock .venv/bin/python benchmarks/trigger_latency.py
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import time

import numpy as np

import asyncfabric as af


async def run(rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    pol = dataclasses.replace(af.ProgressPolicy.latency(), trigger_spin_us=float("inf"))
    async with af.Engine("shm", progress=pol) as a, af.Engine("shm", progress=pol) as b:
        dst = b.register(np.zeros(64, np.uint8)).descriptor()
        src = a.register(np.ones(64, np.uint8))
        fire, ready = af.Flag(), af.Flag()
        trig = a.arm_write(src[:8], dst[:8], fire, 1, imm=1, reset=0, repeat=True)
        rel = b.counter(1).release_word(1, ready, 1, repeat=True)
        out = {}
        for mode in ("triggered", "python_write"):
            lat = []
            for i in range(rounds):
                t0 = time.perf_counter_ns()
                if mode == "triggered":
                    fire.set(1)
                else:
                    await a.write(src[:8], dst[:8], imm=1)
                while ready.value != 1:
                    pass
                lat.append((time.perf_counter_ns() - t0) / 1e3)
                ready.set(0)
                if i % 64 == 0:
                    await asyncio.sleep(0)  # let the loop drain the trigger's events
            s = sorted(lat[warmup:])
            out[mode] = {
                "p50_us": round(statistics.median(s), 2),
                "p99_us": round(s[int(len(s) * 0.99) - 1], 2),
                "rounds": len(s),
            }
        trig.disarm()
        rel.disarm()
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=200)
    a = p.parse_args()
    print(json.dumps(asyncio.run(run(a.rounds, a.warmup))))


if __name__ == "__main__":
    main()
