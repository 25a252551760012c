"""Which batch shapes with CUDA memory reach the native batch path (a crash probe).

Runs write_many over shm between two engines of one process for: a CUDA source into a
host target, a host source into a CUDA (staged) target, and CUDA to CUDA; each case in a
child process, so a crash names its case. Usage: python3 benchmarks/gpu_batch_probe.py
"""

from __future__ import annotations

import asyncio
import faulthandler
import multiprocessing as mp
import sys

CASES = ("cuda->host", "host->cuda", "cuda->cuda", "cuda->host single write")


def one(case: str) -> None:
    faulthandler.enable()
    import numpy as np
    import torch

    import asyncfabric as af

    async def main() -> None:
        async with af.Engine("shm") as a, af.Engine("shm") as b:
            n = 1 << 20
            s_dev, d_dev = case.split(" ")[0].split("->")
            src_t = torch.arange(n, dtype=torch.uint8, device=s_dev if s_dev == "cuda" else "cpu")
            dst_t = torch.zeros(n, dtype=torch.uint8, device=d_dev if d_dev == "cuda" else "cpu")
            src, dst = a.register(src_t), b.register(dst_t)
            d = dst.descriptor()
            print(case, "registered; src", type(src._reg).__name__, getattr(src._reg, "device", None),
                  "cuda_path", getattr(a._t, "cuda_path", None), flush=True)  # fmt: skip
            if case.endswith("single write"):
                await a.write(src, d, imm=1)
            else:
                bt = af.Batch()
                offs = np.arange(16, dtype=np.uint64) * np.uint64(n // 16)
                bt.add_many(src, d, offs, offs, n // 16, imm=1)
                await a.write_many(bt)
            await b.counter(1).wait(
                d.expected_imms(n) if case.endswith("write") else 16, timeout=20
            )
            torch.cuda.synchronize()
            ok = torch.equal(dst_t.cpu(), src_t.cpu())
            print(case, "landed, equal:", ok, flush=True)

    asyncio.run(main())


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    for c in CASES:
        p = ctx.Process(target=one, args=(c,))
        p.start()
        p.join(60)
        if p.is_alive():
            p.kill()
        print(f"case {c!r}: exit code {p.exitcode}", flush=True)
    sys.exit(0)
