"""Two-process loopback demo: move >= 1 GiB of verified data, then measure latency.

    python -m asyncfabric demo [--provider shm] [--gib 1] [--buffer-mib 64]

The parent (writer) starts a receiver process, reads the receiver's descriptor
from its stdout (the out-of-band exchange), introduces itself with a control
message, then writes rounds of fresh random data with an immediate. The
receiver awaits its counter for the expected number of immediates, hashes what
landed and sends the digest back; the writer compares. Finally 8-byte WriteImm
ping-pongs measure the round-trip latency through both event loops.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import time

import numpy as np

import asyncfabric as af

IMM_DATA, IMM_PING, IMM_PONG = 1, 2, 3


def _digest(buf: np.ndarray) -> bytes:
    return hashlib.blake2b(memoryview(buf), digest_size=16).digest()


async def receiver(provider: str, buffer_bytes: int, rounds: int, pings: int) -> None:
    async with af.Engine(provider, **_kw(provider)) as eng:
        dst = np.zeros(buffer_bytes, np.uint8)
        with eng.register(dst) as region:
            print(bytes(region.descriptor()).hex(), flush=True)  # out-of-band: stdout
            writer_desc = af.Descriptor.from_bytes(await eng.recv(timeout=30))
            data = eng.counter(IMM_DATA)
            for _ in range(rounds):
                await data.wait(region.expected_imms(), timeout=60)
                await eng.send(
                    writer_desc, b"landed"
                )  # every immediate counted: all bytes are here
                await eng.send(writer_desc, _digest(dst))
            ping = eng.counter(IMM_PING)
            for _ in range(pings):
                await ping.wait(1, timeout=30)
                await eng.write_imm(writer_desc, IMM_PONG)
            await eng.recv(timeout=30)  # the writer's goodbye


async def writer(provider: str, gib: float, buffer_bytes: int, pings: int) -> int:
    rounds = max(1, int(gib * (1 << 30) // buffer_bytes))
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "asyncfabric.demo",
        "--role",
        "receiver",
        "--provider",
        provider,
        "--buffer-mib",
        str(buffer_bytes >> 20),
        "--rounds",
        str(rounds),
        "--pings",
        str(pings),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 60)  # type: ignore[union-attr]
        if not line:
            raise RuntimeError("the receiver process exited before sending its descriptor")
        remote = af.Descriptor.from_bytes(bytes.fromhex(line.decode().strip()))
        async with af.Engine(provider, **_kw(provider)) as eng:
            print(f"asyncfabric demo: {eng.backend}:{eng.provider}, receiver pid {child.pid}")
            src = np.empty(buffer_bytes, np.uint8)
            pong_buf = np.zeros(64, np.uint8)
            rng = np.random.default_rng()
            with eng.register(src) as region, eng.register(pong_buf) as pong_region:
                await eng.send(remote, bytes(pong_region.descriptor()))
                moved, busy, bad = 0, 0.0, 0
                for r in range(rounds):
                    src[:] = rng.integers(0, 256, buffer_bytes, dtype=np.uint8)
                    want = _digest(src)
                    t0 = time.perf_counter()
                    await eng.write(region, remote, imm=IMM_DATA)
                    landed = await eng.recv(timeout=60)  # the receiver counted every immediate
                    busy += time.perf_counter() - t0
                    assert landed == b"landed", landed
                    got = await eng.recv(timeout=60)  # its digest of what landed
                    moved += buffer_bytes
                    if got != want:
                        bad += 1
                        print(f"round {r}: DIGEST MISMATCH", file=sys.stderr)
                gbps = moved / busy / 1e9
                print(
                    f"moved {moved / (1 << 30):.2f} GiB in {rounds} writes of "
                    f"{buffer_bytes >> 20} MiB ({remote.expected_imms(buffer_bytes)} immediates each): "
                    f"{gbps:.2f} GB/s (write until the receiver's counter fired), "
                    f"{'all verified' if not bad else f'{bad} rounds CORRUPT'}"
                )
                pong = eng.counter(IMM_PONG)
                rtts = []
                for _ in range(pings):
                    t0 = time.perf_counter()
                    await eng.write_imm(remote, IMM_PING)
                    await pong.wait(1, timeout=30)
                    rtts.append((time.perf_counter() - t0) * 1e6)
                rtts.sort()
                p50 = statistics.median(rtts)
                p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
                print(
                    f"latency: {pings} WriteImm ping-pongs, round trip p50 {p50:.1f} us, "
                    f"p99 {p99:.1f} us (one way ~{p50 / 2:.1f} us)"
                )
                await eng.send(remote, b"bye")
        rc = await asyncio.wait_for(child.wait(), 60)
        if rc:
            print(f"receiver exited with {rc}", file=sys.stderr)
            return 1
        return 1 if bad else 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


def _kw(provider: str) -> dict:
    return {"node": "127.0.0.1"} if provider.startswith("tcp") else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="asyncfabric demo", description=__doc__.splitlines()[0])
    p.add_argument("--provider", default="shm", help="libfabric provider (default: shm)")
    p.add_argument("--gib", type=float, default=1.0, help="GiB of data to move (default: 1)")
    p.add_argument("--buffer-mib", type=int, default=64, help="size of one write (default: 64)")
    p.add_argument("--pings", type=int, default=2000, help="latency round trips (default: 2000)")
    p.add_argument(
        "--role", choices=["writer", "receiver"], default="writer", help=argparse.SUPPRESS
    )
    p.add_argument("--rounds", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.buffer_mib <= 0 or a.gib <= 0 or a.pings <= 0:
        p.error("--gib, --buffer-mib and --pings must be positive")
    if a.role == "receiver":
        af.run(receiver(a.provider, a.buffer_mib << 20, a.rounds, a.pings))
        return 0
    return af.run(writer(a.provider, a.gib, a.buffer_mib << 20, a.pings))


if __name__ == "__main__":
    sys.exit(main())
