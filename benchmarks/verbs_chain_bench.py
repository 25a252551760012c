"""pyverbs ``write_many``: chain length (WRs per ``ibv_post_send``, one signaled) against MB/s.

    scripts/softroce/run-in-guest.sh --timeout 600 -- .venv/bin/python benchmarks/verbs_chain_bench.py

For 4 KiB and 64 KiB entries: a Batch of entries (1 MiB of 4 KiB, 4 MiB of 64 KiB, one
immediate each) reposted by two lanes at once, sender in this process, receiver in a second;
timed until the receiver has counted every immediate (MB/s = 10^6 B/s, like perftest). The chain length is
``VerbsTransport.chain_wrs`` (``ASYNCFABRIC_VERBS_CHAIN``), set here between points on the
sender only. ``write_paged`` of the same entries (one chain per op, as long as the send queue
has room) is the reference. Rounds interleave the points; the median is printed, with the
sender's user and system CPU per entry (user: mostly Python building WRs and reaping
completions; system: mostly rxe itself, which does a user QP's requester work inside
``ibv_post_send``). Under TCG absolute numbers mean little: read the ratios.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time

import numpy as np

import asyncfabric as af
from asyncfabric.backends.verbs._transport import VerbsTransport
from asyncfabric.testing.peer import PeerProcess

CHAINS = (1, 2, 4, 8, 16)
SIZES = {4096: 256, 65536: 64}  # entry size -> entries per batch
LANES = 2


async def measure(size: int, per: int, total: int, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    async with PeerProcess("pyverbs", chunk_bytes=1 << 20) as peer, af.Engine("pyverbs") as eng:
        nb = size * per * LANES
        _, desc_b = await peer.alloc(nb)
        desc = af.Descriptor.from_bytes(desc_b)
        with eng.register(np.ones(nb, np.uint8)) as region:
            await eng.write(region[0:size], desc[0:size], imm=9)  # connect, warm up
            await peer.wait(9, 1)
            offs = [np.arange(k * per, (k + 1) * per, dtype=np.uint64) * size for k in range(LANES)]
            batches = [af.Batch().add_many(region, desc, o, o, size, imm=1) for o in offs]
            posts = max(LANES, total // (size * per))

            async def run(kind: str) -> tuple[float, float]:
                async def lane(k: int) -> None:
                    for _ in range(k, posts, LANES):
                        if kind == "paged":
                            p = offs[k] // size
                            await eng.write_paged(region, desc, p, p, page_size=size, imm=1)
                        else:
                            await eng.write_many(batches[k])

                c0, t0 = os.times(), time.perf_counter()
                await asyncio.gather(*(lane(k) for k in range(LANES)))
                await peer.wait(1, posts * per, timeout=300)
                dt, c1, n = time.perf_counter() - t0, os.times(), posts * per
                us = ((c1.user - c0.user) / n * 1e6, (c1.system - c0.system) / n * 1e6)
                return size * n / dt / 1e6, us

            for kind in ("paged", *map(str, CHAINS)):  # compile, warm up
                if kind != "paged":
                    VerbsTransport.chain_wrs = int(kind)
                    await eng.write_many(batches[0])
                    await peer.wait(1, per)
            for _ in range(rounds):
                for kind in (*map(str, CHAINS), "paged"):
                    if kind != "paged":
                        VerbsTransport.chain_wrs = int(kind)
                    mbs, (user, sys_) = await run(kind)
                    out.setdefault(kind, []).append(mbs)
                    out.setdefault(kind + " user", []).append(user)
                    out.setdefault(kind + " sys", []).append(sys_)
                    print(f"  {size} B chain {kind}: {mbs:.1f} MB/s, user {user:.0f} us, "
                          f"sys {sys_:.0f} us per entry", flush=True)  # fmt: skip
    return out


async def main() -> int:
    quick = "--quick" in sys.argv
    total, rounds = (8 << 20, 2) if quick else (16 << 20, 5)
    res: dict = {}
    try:  # the same sizes on perftest, for the ratio
        from verbs_guest_bench import ib_write_bw

        perf = {size: ib_write_bw(size, 2000 if size < 65536 else 500) for size in SIZES}
        print(f"perftest ib_write_bw: {perf}", flush=True)
    except Exception as exc:
        perf = {}
        print(f"perftest: not measured ({exc})", flush=True)
    for size, per in SIZES.items():
        res[size] = await measure(size, per, total, rounds)
    print(
        "\n| entry | " + " | ".join(f"chain {c}" for c in CHAINS) + " | write_paged | ib_write_bw |"
    )
    print("|---" * (len(CHAINS) + 3) + "|")
    for size, r in res.items():
        cells = [
            f"{statistics.median(r[k]):.1f} ({statistics.median(r[k + ' user']):.0f}"
            f"/{statistics.median(r[k + ' sys']):.0f} µs)"
            for k in (*map(str, CHAINS), "paged")
        ]
        ref = f"{perf[size]:.1f} MB/s" if size in perf else "-"
        print(f"| {size // 1024} KiB | " + " | ".join(cells) + f" | {ref} |")
    print(json.dumps({"perftest": perf, **res}))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
