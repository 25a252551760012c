"""A stream of one `await eng.write` per write, for profiling the sender.

LANES coroutines each await their writes of SIZE bytes in turn (the runner's
`asyncfabric` impl of the write suite), N writes a repeat, into a receiver in a
spawned process that counts them and acknowledges each repeat. Prints writes/s
per repeat and, at the end, the sender engine's stats. Environment:

    SIZE (65536)  N (8192)  LANES (64)  REPS (4)
    PIN=1         sender on CPU 0, receiver on CPU 1
    PROF=1        cProfile of the last repeat into await_stream.prof

Used for benchmarks/README.md, "One `await write` at 64 KiB, 2026-12-08"; builds
compared side by side with PYTHONPATH=<tree> on the same interpreter.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time

import numpy as np

import asyncfabric as af

SIZE = int(os.environ.get("SIZE", 65536))
N = int(os.environ.get("N", 8192))
LANES = int(os.environ.get("LANES", 64))
IMM, ACK = 0x1234, 0x4321


def receiver(conn) -> None:
    if os.environ.get("PIN"):
        os.sched_setaffinity(0, [1])

    async def main() -> None:
        async with af.Engine("shm") as eng:
            reg = eng.register(np.ones(SIZE, np.uint8))
            conn.send(bytes(reg.descriptor()))
            ack = af.Descriptor.from_bytes(conn.recv())
            c = eng.counter(IMM)
            for _ in range(conn.recv()):
                await c.wait(N, timeout=60)
                await eng.write_imm(ack, ACK)
            conn.recv()

    asyncio.run(main())


async def sender(conn, reps: int, prof: bool) -> None:
    if os.environ.get("PIN"):
        os.sched_setaffinity(0, [0])
    async with af.Engine("shm") as eng:
        dst = af.Descriptor.from_bytes(conn.recv())
        src = eng.register(np.ones(SIZE, np.uint8))
        ack = eng.register(np.zeros(8, np.uint8))
        conn.send(bytes(ack.descriptor()))
        conn.send(reps)
        acks = eng.counter(ACK)
        write = eng.write

        async def lane(k: int) -> None:
            for _ in range(k, N, LANES):
                await write(src, dst, imm=IMM)

        for r in range(reps):
            if prof and r == reps - 1:
                import cProfile

                p = cProfile.Profile()
                p.enable()
            t0 = time.perf_counter()
            await asyncio.gather(*(lane(k) for k in range(LANES)))
            await acks.wait(1, timeout=60)
            dt = time.perf_counter() - t0
            if prof and r == reps - 1:
                p.disable()
                p.dump_stats("await_stream.prof")
            print(f"rep {r}: {N / dt / 1e3:.0f} K writes/s, {dt / N * 1e6:.2f} us/write, "
                  f"{N * SIZE / dt / 1e9:.2f} GB/s", flush=True)  # fmt: skip
        print("stats", {k: v for k, v in eng.stats().items() if v}, flush=True)
        conn.send(None)


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=receiver, args=(b,))
    p.start()
    asyncio.run(sender(a, int(os.environ.get("REPS", 4)), os.environ.get("PROF") == "1"))
    p.join()
