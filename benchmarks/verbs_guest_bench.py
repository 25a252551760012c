"""Verbs paths against perftest on the same rxe0, in one SoftRoCE guest run.

    scripts/softroce/run-in-guest.sh --timeout 900 -- .venv/bin/python benchmarks/verbs_guest_bench.py

Measures perftest ``ib_write_bw -s 65536`` and ``ib_write_lat -s 8`` on rxe0, then asyncfabric's
64 KiB write stream (a window of writes in flight, two processes) and an 8-byte pingpong
(write with immediate, answered by a zero-byte write_imm) on ``libfabric:verbs;ofi_rxm`` and on
``pyverbs``; prints a markdown table with the ratios and writes benchmarks/verbs_guest.json.
Under TCG absolute numbers mean little: read the ratios.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import asyncfabric as af
from asyncfabric.testing.peer import PeerProcess

HOST_IP = "10.0.2.15"  # the guest's own address (QEMU user networking)
SPECS = ("libfabric:verbs;ofi_rxm", "pyverbs")


def perftest(tool: str, args: list[str], port: int) -> str:
    base = [tool, "-d", "rxe0", "-x", "1", "-p", str(port), *args]
    srv = subprocess.Popen(base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(2)
    try:
        cli = subprocess.run(
            [*base, HOST_IP], capture_output=True, text=True, timeout=300, check=False
        )
    finally:
        try:
            srv.wait(30)
        except subprocess.TimeoutExpired:
            srv.kill()
    return cli.stdout + cli.stderr


def ib_write_bw(size: int, iters: int) -> float:
    out = perftest("ib_write_bw", ["-s", str(size), "-n", str(iters)], 18515)
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 5 and f[0] == str(size) and f[1] == str(iters):
            return float(f[3])  # BW average [MB/sec]
    raise RuntimeError(f"cannot parse ib_write_bw output:\n{out}")


def ib_write_lat(size: int, iters: int) -> tuple[float, float]:
    out = perftest("ib_write_lat", ["-s", str(size), "-n", str(iters)], 18516)
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 6 and f[0] == str(size) and f[1] == str(iters):
            return float(f[4]), float(f[2])  # t_typical, t_min [usec]
    raise RuntimeError(f"cannot parse ib_write_lat output:\n{out}")


async def write_stream(spec: str, size: int, count: int, window: int) -> float:
    async with PeerProcess(spec) as peer, af.Engine(spec) as eng:
        _, desc_b = await peer.alloc(size * window)
        desc = af.Descriptor.from_bytes(desc_b)
        with eng.register(np.ones(size * window, np.uint8)) as region:
            await eng.write(region[0:size], desc[0:size], imm=9)  # connect, warm up
            await peer.wait(9, 1)
            # `window` lanes, each awaiting its own writes in turn (as the benchmark
            # runner streams): `window` in flight, one coroutine each, slices made once.
            slots = [(region[k * size : (k + 1) * size], desc[k * size : (k + 1) * size])
                     for k in range(window)]  # fmt: skip

            async def lane(k: int) -> None:
                src, dst = slots[k]
                for _ in range(k, count, window):
                    await eng.write(src, dst, imm=1)

            t0 = time.perf_counter()
            await asyncio.gather(*(lane(k) for k in range(window)))
            await peer.wait(1, count, timeout=300)
            dt = time.perf_counter() - t0
        return size * count / dt / 1e6  # MB/s, like perftest


async def paged_stream(spec: str, size: int, count: int, batch: int, lanes: int) -> float:
    """The same 64 KiB writes, ``batch`` of them per ``write_paged`` call (one await, one
    event per batch), ``lanes`` calls in flight: what the data path does without
    per-write Python."""
    async with PeerProcess(spec) as peer, af.Engine(spec) as eng:
        _, desc_b = await peer.alloc(size * batch * lanes)
        desc = af.Descriptor.from_bytes(desc_b)
        with eng.register(np.ones(size * batch * lanes, np.uint8)) as region:
            await eng.write(region[0:size], desc[0:size], imm=9)  # connect, warm up
            await peer.wait(9, 1)
            maps = [np.arange(k * batch, (k + 1) * batch, dtype=np.uint64) for k in range(lanes)]

            async def lane(k: int) -> None:
                for _ in range(k, count // batch, lanes):
                    await eng.write_paged(region, desc, maps[k], maps[k], page_size=size, imm=1)

            t0 = time.perf_counter()
            await asyncio.gather(*(lane(k) for k in range(lanes)))
            await peer.wait(1, count // batch * batch, timeout=300)
            dt = time.perf_counter() - t0
        return size * (count // batch * batch) / dt / 1e6


async def pingpong(spec: str, iters: int, **kw) -> tuple[float, float]:
    async with PeerProcess(spec, **kw) as peer, af.Engine(spec, **kw) as eng:
        _, desc_b = await peer.alloc(64)
        pdesc = af.Descriptor.from_bytes(desc_b)
        with (
            eng.register(np.zeros(64, np.uint8)) as mine,
            eng.register(np.ones(8, np.uint8)) as src,
        ):
            await peer.call("echo", bytes(mine.descriptor()), 1, 2, iters + 10)
            back = eng.counter(2)
            rtts = []
            for i in range(iters + 10):
                t0 = time.perf_counter()
                await eng.write(src, pdesc[0:8], imm=1)
                await back.wait(1, timeout=30)
                if i >= 10:
                    rtts.append(time.perf_counter() - t0)
            await peer._reply(60)
        half = sorted(r / 2 * 1e6 for r in rtts)
        return statistics.median(half), half[0]


async def main() -> int:
    quick = "--quick" in sys.argv
    n_bw, n_lat = (500, 300) if quick else (2000, 1000)
    rows = []
    bw = ib_write_bw(65536, n_bw)
    lat_typ, lat_min = ib_write_lat(8, n_lat)
    rows.append(("perftest", bw, lat_typ, lat_min))
    print(
        f"perftest: ib_write_bw 64KiB {bw:.1f} MB/s; ib_write_lat 8B typical {lat_typ} us",
        flush=True,
    )
    for spec in SPECS:
        try:
            mbs = await write_stream(spec, 65536, n_bw, 128)  # perftest's tx depth
            p50, pmin = await pingpong(spec, n_lat // 2)
        except Exception as exc:
            print(f"{spec}: FAILED {type(exc).__name__}: {exc}", flush=True)
            rows.append((spec, float("nan"), float("nan"), float("nan")))
            continue
        rows.append((spec, mbs, p50, pmin))
        print(f"{spec}: write 64KiB {mbs:.1f} MB/s; pingpong 8B p50 {p50:.1f} us", flush=True)
        try:  # the same writes, 64 per write_paged call, 2 calls in flight (128 writes)
            mbs = await paged_stream(spec, 65536, n_bw, 64, 2)
        except Exception as exc:
            print(f"{spec} write_paged: FAILED {type(exc).__name__}: {exc}", flush=True)
        else:
            rows.append((f"{spec} (write_paged, 64 per call)", mbs, float("nan"), float("nan")))
            print(f"{spec}: write_paged 64 x 64KiB {mbs:.1f} MB/s", flush=True)
        try:  # the same pingpong with both ends spinning (ProgressPolicy.latency())
            p50, pmin = await pingpong(spec, n_lat // 2, progress=af.ProgressPolicy.latency())
        except Exception as exc:
            print(f"{spec} latency policy: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        rows.append((f"{spec} (latency policy)", float("nan"), p50, pmin))
    print()
    print(
        "| path | write 64 KiB MB/s | vs ib_write_bw | 8 B one-way p50 us | min us | vs ib_write_lat typical |"
    )
    print("|---|---|---|---|---|---|")
    for name, mbs, p50, pmin in rows:
        print(
            f"| {name} | {mbs:.1f} | {mbs / bw:.0%} | {p50:.1f} | {pmin:.1f} | "
            f"{p50 / lat_typ:.1f}x |"
        )
    out = Path(__file__).with_name("verbs_guest.json")
    out.write_text(
        json.dumps(
            [dict(zip(("path", "write_64k_MBps", "lat8_p50_us", "lat8_min_us"), r)) for r in rows],
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
