"""GPU benchmark, all numbers from one run (docs/gpu.md, benchmarks/GPU.md).

Two processes: this one on GPU 0, a child on GPU 1 (GPU 0 when only one).
Measures torch's peer copy, pinned device<->host copies, the cuda_ipc backend's
write bandwidth and immediate latency, shm host write bandwidth, and the staged
path GPU->GPU over shm. Every bandwidth run ends with a byte-for-byte check on
random data. Prints a JSON object; ``--out FILE`` also writes it there.

    python benchmarks/gpu_bench.py --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

import torch

import asyncfabric as af

MiB = 1 << 20


def _digest(t: Any) -> str:
    return hashlib.sha256(t.reshape(-1).cpu().numpy().tobytes()).hexdigest()


def _open(provider: str, lanes: int) -> af.Engine:
    """An engine of ``lanes`` domains, each owned by its own progress thread (one
    lane: the default engine)."""
    if lanes == 1:
        return af.Engine(provider, progress=af.ProgressPolicy.latency())
    return af.Engine(
        provider, domains=lanes, workers=lanes, local_only=True,
        progress=af.ProgressPolicy.latency(),
    )  # fmt: skip


def _child(conn: Any, provider: str, device: str, nbytes: int, lanes: int = 1) -> None:
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))

    async def main() -> None:
        async with _open(provider, lanes) as eng:
            buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
            region = eng.register(buf)
            small = eng.register(torch.zeros(64, dtype=torch.uint8, device=device))
            conn.send((bytes(region.descriptor()), bytes(small.descriptor())))
            peer_small = af.Descriptor.from_bytes(conn.recv())
            loop = asyncio.get_running_loop()
            while True:
                cmd, *a = await loop.run_in_executor(None, conn.recv)
                if cmd == "exit":
                    break
                if cmd == "sink":  # count n immediates of imm, then ack with one
                    n, imm = a
                    await eng.counter(imm).wait(n, timeout=120)
                    await eng.write_imm(peer_small, imm)
                elif cmd == "pong":  # answer each arrival with the same kind of write
                    iters, nb = a
                    src = small[0:nb]
                    for _ in range(iters):
                        await eng.counter(1).wait(1, timeout=30)
                        if nb:
                            await eng.write(src, peer_small[0:nb], imm=2)
                        else:
                            await eng.write_imm(peer_small, 2)
                    conn.send("done")
                elif cmd == "digest":
                    off, n = a
                    conn.send(_digest(buf[off : off + n]))

    asyncio.run(main())


async def _engine_run(
    provider: str,
    peer_dev: str,
    src_dev: str,
    sizes: list[int],
    lat: bool,
    budget: int,
    lanes: int = 1,
):
    """Bandwidth (and latency) of one provider between this process and a child."""
    out: dict[str, Any] = {"lanes": lanes}
    top = max(sizes)
    ctx = mp.get_context("spawn")
    pc, cc = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(cc, provider, peer_dev, top, lanes), daemon=True)
    proc.start()
    try:
        async with _open(provider, lanes) as eng:
            desc_b, small_b = await asyncio.to_thread(pc.recv)
            desc = af.Descriptor.from_bytes(desc_b)
            peer_small = af.Descriptor.from_bytes(small_b)
            mine = torch.zeros(64, dtype=torch.uint8, device=src_dev)
            small = eng.register(mine)
            pc.send(bytes(small.descriptor()))
            src = torch.randint(0, 256, (top,), dtype=torch.uint8, device=src_dev)
            region = eng.register(src)
            out["cuda_path"] = eng.transport.cuda_path
            ack = eng.counter(99)
            for n in sizes:
                per = desc.expected_imms(n)
                # "wN": N writes at a time (asyncio.gather), round after round, so the
                # pipeline drains between rounds; "lN": N lanes, each awaiting its own
                # writes in turn, so N stay in flight all the time.
                for mode, window in (("w", 1), ("w", 8), ("l", 8)):
                    iters = max(4, min(256, budget // n // window))
                    for timed in (False, True):  # a warm-up pass, then the timed one
                        reps = iters if timed else 1
                        t0 = time.perf_counter()
                        pc.send(("sink", per * window * reps, 1))
                        if mode == "w":
                            for _ in range(reps):
                                await asyncio.gather(
                                    *(eng.write(region[:n], desc[:n], imm=1) for _ in range(window))
                                )
                        else:

                            async def lane(k: int = reps, src=region[:n], dst=desc[:n]) -> None:
                                for _ in range(k):
                                    await eng.write(src, dst, imm=1)

                            await asyncio.gather(*(lane() for _ in range(window)))
                        await _wait_ack(eng, ack)
                        dt = time.perf_counter() - t0
                    out[f"write_{n // MiB}MiB_{mode}{window}_GBps"] = round(
                        n * window * iters / dt / 1e9, 2
                    )
                pc.send(("digest", 0, n))
                ok = (await asyncio.to_thread(pc.recv)) == _digest(src[:n])
                out[f"write_{n // MiB}MiB_verified"] = ok
            if lat:
                for nb in (0, 8):
                    iters = 2000
                    pc.send(("pong", iters, nb))
                    rtts = []
                    c2 = eng.counter(2)
                    for _ in range(iters):
                        t0 = time.perf_counter_ns()
                        if nb:
                            await eng.write(small[0:nb], peer_small[0:nb], imm=1)
                        else:
                            await eng.write_imm(peer_small, 1)
                        await c2.wait(1, timeout=30)
                        rtts.append(time.perf_counter_ns() - t0)
                    await asyncio.to_thread(pc.recv)
                    rtts = rtts[200:]
                    out[f"imm_{nb}B_oneway_p50_us"] = round(statistics.median(rtts) / 2e3, 2)
                    out[f"imm_{nb}B_oneway_p99_us"] = round(
                        sorted(rtts)[int(len(rtts) * 0.99)] / 2e3, 2
                    )
            region.close()
            pc.send(("exit",))
    finally:
        await asyncio.to_thread(proc.join, 30)
        if proc.is_alive():
            proc.kill()
    return out


async def _wait_ack(eng: af.Engine, ack: Any) -> None:
    # the child answers a finished "sink" with one write_imm carrying 1 to our small region
    await eng.counter(1).wait(1, timeout=120)


def _copy_bw(dst: Any, src: Any, iters: int = 20) -> float:
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        dst.copy_(src, non_blocking=True)
    e.record()
    torch.cuda.synchronize()
    return src.numel() * src.element_size() * iters / (s.elapsed_time(e) / 1e3) / 1e9


def copies(sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ng = torch.cuda.device_count()
    for n in sizes:
        a = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda:0")
        h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        out[f"d2h_pinned_{n // MiB}MiB_GBps"] = round(_copy_bw(h, a), 2)
        out[f"h2d_pinned_{n // MiB}MiB_GBps"] = round(_copy_bw(a, h), 2)
        if ng > 1:
            b = torch.empty(n, dtype=torch.uint8, device="cuda:1")
            out[f"torch_peer_{n // MiB}MiB_GBps"] = round(_copy_bw(b, a), 2)
            assert torch.equal(b.cpu(), a.cpu())
    return out


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    torch.cuda.set_device(0)
    sizes = [s * MiB for s in args.sizes]
    peer = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
    }
    res["copies"] = copies(sizes)
    # bytes per timed measurement: NVLink needs ~8 GiB for ~20 ms (a 2 GiB window is
    # ~6 ms, where the sink/ack hand-shake itself shows); host paths are 50x slower
    nv, host = 8 << 30, 2 << 30
    if not args.no_ipc:
        ipc_sizes = [s * MiB for s in args.ipc_sizes] if args.ipc_sizes else sizes
        res["nvlink_cuda_ipc"] = await _engine_run("cuda_ipc", peer, "cuda:0", ipc_sizes, True, nv)
        if args.ipc_ab:  # a large copy's end by a copy notice (host function), not a trigger
            os.environ["ASYNCFABRIC_CUDA_IPC_TRIGGERS"] = "0"  # (the child inherits it)
            try:
                res["nvlink_cuda_ipc_copy_notices"] = await _engine_run(
                    "cuda_ipc", peer, "cuda:0", ipc_sizes, False, nv
                )
            finally:
                del os.environ["ASYNCFABRIC_CUDA_IPC_TRIGGERS"]
            res["nvlink_cuda_ipc_triggers_again"] = await _engine_run(
                "cuda_ipc", peer, "cuda:0", ipc_sizes, False, nv
            )
    for lanes in args.lanes:
        # the host transport's own multi-lane bandwidth, then the staged path on it
        sfx = "" if lanes == 1 else f"_lanes{lanes}"
        res["shm_host" + sfx] = await _engine_run("shm", "cpu", "cpu", sizes, False, host, lanes)
        res["shm_staged_gpu" + sfx] = await _engine_run(
            "shm", peer, "cuda:0", sizes, lanes == 1, host, lanes
        )
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="MiB")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--lanes", type=int, nargs="+", default=[1],
        help="host and staged runs over engines of N domains, N progress threads each",
    )  # fmt: skip
    ap.add_argument("--no-ipc", action="store_true", help="skip the cuda_ipc run")
    ap.add_argument("--ipc-sizes", type=int, nargs="+", default=None, help="MiB, cuda_ipc runs")
    ap.add_argument(
        "--ipc-ab", action="store_true",
        help="cuda_ipc again with large copies ended by triggers, then with notices again",
    )  # fmt: skip
    args = ap.parse_args()
    res = asyncio.run(amain(args))
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
