"""Which batch shapes with CUDA memory reach the native batch path (a crash probe).

Each case runs in a child process, so a crash names its case; every case prints
``landed, equal: True`` (or ``refused as expected``) when sound. Usage:
python3 benchmarks/gpu_batch_probe.py [CASE-SUBSTRING ...]
(``AF_PROBE_DEVICE=cpu``: the shm and weights-on-shm cases on host tensors, a smoke test
of the script where there is no GPU.)

* shm (CUDA staged through host mirrors): write_many between two engines of one process,
  CUDA to host, host to CUDA, CUDA to CUDA, and a single write;
* cuda_ipc, the provider benchmarks/gpu_weights.py picks where it opens: the same
  write_many shapes, scatter and barrier into CUDA targets, and CUDA into a host target
  (refused, naming the entry). Before the fix cuda_ipc forwarded every batch to the shm
  transport's native batch path, which memcpy()d from the device pointers: the SIGSEGV
  under ``afe_post_batch`` of the weights run of 2026-12-06 (docs/weights.md "GPU");
* the guard: a staged CUDA registration handed straight to shm's native batch path must
  be refused with a RegionError, not crash;
* the weights pattern itself (asyncfabric.weights Sender/Receiver, every engine in one
  process as in gpu_weights.py's bitwise cases, a small made-up model: direct runs,
  staged buckets, a replicated parameter, acks), bf16 and bf16 -> fp8, on shm and on
  cuda_ipc, checked bitwise.
"""

from __future__ import annotations

import asyncio
import faulthandler
import multiprocessing as mp
import os
import sys

DEV = os.environ.get("AF_PROBE_DEVICE", "cuda")


def _sync() -> None:
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


BASIC = ("cuda->host", "host->cuda", "cuda->cuda", "cuda->host single write")
CASES = (
    *(f"shm {c}" for c in BASIC),
    "cuda_ipc cuda->cuda",
    "cuda_ipc host->cuda",
    "cuda_ipc cuda->cuda single write",
    "cuda_ipc scatter+barrier",
    "cuda_ipc cuda->host refused",
    "shm guard: staged registration to the native batch refused",
    "weights bf16 shm",
    "weights bf16 cuda_ipc",
    "weights fp8 shm",
    "weights fp8 cuda_ipc",
)


async def _basic(case: str) -> None:
    import numpy as np
    import torch

    import asyncfabric as af

    provider, shape = case.split(" ", 1)
    async with af.Engine(provider) as a, af.Engine(provider) as b:
        n = 1 << 20
        s_dev, d_dev = shape.split(" ")[0].split("->")
        src_t = torch.arange(n, dtype=torch.uint8, device=DEV if s_dev == "cuda" else "cpu")
        dst_t = torch.zeros(n, dtype=torch.uint8, device=DEV if d_dev == "cuda" else "cpu")
        src, dst = a.register(src_t), b.register(dst_t)
        d = dst.descriptor()
        print(case, "registered; src", type(src._reg).__name__, getattr(src._reg, "device", None),
              "cuda_path", getattr(a._t, "cuda_path", None), flush=True)  # fmt: skip
        bt = af.Batch()
        offs = np.arange(16, dtype=np.uint64) * np.uint64(n // 16)
        bt.add_many(src, d, offs, offs, n // 16, imm=1)
        if shape.endswith("refused"):
            try:
                await a.write_many(bt)
            except af.RegionError as exc:
                print(case, "refused as expected:", exc, flush=True)
                return
            raise AssertionError("a CUDA source into a host target was not refused")
        if shape.endswith("single write"):
            await a.write(src, d, imm=1)
            want = d.expected_imms(n)
        else:
            for _ in range(2):  # a reposted batch too
                await a.write_many(bt)
            want = 2 * 16
        await b.counter(1).wait(want, timeout=20)
        _sync()
        print(case, "landed, equal:", torch.equal(dst_t.cpu(), src_t.cpu()), flush=True)


async def _scatter_barrier(case: str) -> None:
    import torch

    import asyncfabric as af

    async with af.Engine("cuda_ipc") as a, af.Engine("cuda_ipc") as b:
        src_t = torch.arange(8192, dtype=torch.int32, device="cuda").view(torch.uint8)
        d1_t = torch.zeros(16384, dtype=torch.uint8, device="cuda")
        d2_t = torch.zeros(16384, dtype=torch.uint8, device="cuda")
        ack_t = torch.zeros(64, dtype=torch.uint8)  # a host target beside them
        src = a.register(src_t)
        d1, d2, ack = (b.register(t).descriptor() for t in (d1_t, d2_t, ack_t))
        await a.scatter(src[0:8192], [d1[0:4096], d2[100:4196]], imm=3)
        await a.barrier([d1, d2, ack], 4)
        await b.counter(3).wait(2, timeout=20)
        await b.counter(4).wait(3, timeout=20)
        _sync()
        ok = torch.equal(d1_t[:4096], src_t[:4096]) and torch.equal(
            d2_t[100:4196], src_t[4096:8192]
        )
        print(case, "landed, equal:", ok, flush=True)


async def _guard(case: str) -> None:
    import numpy as np
    import torch

    import asyncfabric as af
    from asyncfabric.transport import WriteBatch
    from asyncfabric.transport.counting import NO_IMM

    async with af.Engine("shm") as a, af.Engine("shm") as b:
        if DEV == "cuda":
            src = a.register(torch.ones(4096, dtype=torch.uint8, device="cuda"))
        else:  # the smoke test: a host tensor staged as a CUDA one would be
            from asyncfabric.testing.peer import register_staged

            src = register_staged(a, torch.ones(4096, dtype=torch.uint8))
        dst = b.register(torch.zeros(4096, dtype=torch.uint8))
        assert src.staged, "expected shm to stage CUDA memory"
        t = a.transport.inner  # the libfabric transport under the staged wrapper
        wb = WriteBatch(
            1 << 30, (src._reg,), (a._route(dst.descriptor()).remote,),
            np.zeros(1, np.uint32), np.zeros(1, np.uint32), np.zeros(1, np.uint64),
            np.zeros(1, np.uint64), np.full(1, 4096, np.uint64), np.full(1, NO_IMM, np.int64),
            np.zeros(1, np.int32), {}, {},
        )  # fmt: skip
        try:
            t.post_batch(wb)
        except af.RegionError as exc:
            print(case, "refused as expected:", exc, flush=True)
            return
        raise AssertionError("the native batch path took a staged CUDA registration")


async def _weights(case: str) -> None:
    import torch

    import asyncfabric as af
    from asyncfabric.weights import Layout, Receiver, Replicated, Sender, Split, column, row
    from asyncfabric.weights import fp8 as fp8mod

    _, kind, provider = case.split(" ")
    fp8 = kind == "fp8"
    dev = "cuda:0" if DEV == "cuda" else "cpu"
    g = torch.Generator(device=dev).manual_seed(3)
    shapes = {"qkv.weight": (384, 128), "o.weight": (128, 128), "norm.weight": (128,)}
    full = {
        n: torch.randn(s, generator=g, device=dev).to(torch.bfloat16) for n, s in shapes.items()
    }
    specs = {"qkv.weight": column((128, 128, 128)), "o.weight": row(), "norm.weight": Replicated()}
    tl = Layout(2, [(n, shapes[n], torch.bfloat16, Split(0)) for n in shapes])
    i_dt = {n: torch.float8_e4m3fn if fp8 and n != "norm.weight" else torch.bfloat16
            for n in shapes}  # fmt: skip
    il = Layout(2, [(n, shapes[n], i_dt[n], specs[n]) for n in shapes])
    async with af.Engine(provider) as t0, af.Engine(provider) as t1, \
            af.Engine(provider) as r0, af.Engine(provider) as r1:  # fmt: skip
        bufs = [tl.alloc(r, dev) for r in range(2)]
        for r in range(2):
            tl.fill(bufs[r], r, full)
        txs = [Sender(e, tl, r, bufs[r], cast=fp8, bucket_bytes=16384, depth=2)
               for r, e in enumerate((t0, t1))]  # fmt: skip
        rxs = [Receiver(e, il, r, tl, index=r, cast=fp8, device=dev)
               for r, e in enumerate((r0, r1))]  # fmt: skip
        print(case, "regions:", type(txs[0]._region._reg).__name__, "staged",
              txs[0]._region.staged, flush=True)  # fmt: skip
        for rx in rxs:
            await rx.start([t.info for t in txs])
        names = il.fp8
        amax = None
        if fp8:
            a = torch.stack([t.local_amax(names) for t in txs]).amax(0).tolist()
            amax = dict(zip(names, a))
        for v in (1, 2):
            await asyncio.gather(
                *(t.update(v, [rx.info for rx in rxs], amax=amax, timeout=20) for t in txs),
                *(rx.wait_version(v, timeout=30) for rx in rxs),
            )
        equal = fp8mod.shards_equal(il, rxs, fp8mod.reference(il, full))
        for x in (*txs, *rxs):
            x.close()
        print(case, "landed, equal:", all(equal), equal, flush=True)


def one(case: str) -> None:
    faulthandler.enable()
    if case.startswith("weights"):
        coro = _weights(case)
    elif case.startswith("shm guard"):
        coro = _guard(case)
    elif case == "cuda_ipc scatter+barrier":
        coro = _scatter_barrier(case)
    else:
        coro = _basic(case)
    asyncio.run(coro)


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    picked = [c for c in CASES if not sys.argv[1:] or any(a in c for a in sys.argv[1:])]
    for c in picked:
        p = ctx.Process(target=one, args=(c,))
        p.start()
        p.join(90)
        if p.is_alive():
            p.kill()
            p.join()
        print(f"case {c!r}: exit code {p.exitcode}", flush=True)
    sys.exit(0)
