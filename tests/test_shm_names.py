"""shm regions and doorbells in /dev/shm: unique names, and what dead processes left reclaimed.

libfabric 1.17's shm provider names a region after the process ("<pid>:0:0"); a process
SIGKILLed with one open leaves it behind, and a later process given the same pid could not
open an engine (and, before the fix, crashed closing the half-open one). Engines now name
their regions "af-<pidns>-<pid>-<random>" and sweep the regions and doorbell pages of dead
processes of their pid namespace when they open.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import asyncfabric as af
from asyncfabric.backends.libfabric import LibfabricBackend

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        "shm" not in LibfabricBackend().providers(), reason="libfabric's shm provider is not here"
    ),
]

SHM = Path("/dev/shm")
BELL_MAGIC = 0x6C6C6562666661


def _pidns() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _bell(path: Path, pid: int, pidns: int) -> None:
    # af_bell_page: sleeping, waiting, pid, pidns (u32 each), magic (u64)
    path.write_bytes(
        struct.pack("<IIIIQ", 0, 0, pid, pidns & 0xFFFFFFFF, BELL_MAGIC).ljust(4096, b"\0")
    )


def test_engine_opens_where_a_dead_process_left_a_region_under_its_pid():
    # The CI failure: a worker got the pid of a process killed earlier, whose shm region
    # "<pid>:0:0" was still there. Run in a fresh process so the stale name is its own pid.
    script = textwrap.dedent(
        """
        import asyncio, os
        import numpy as np
        import asyncfabric as af

        stale = f"/dev/shm/{os.getpid()}:0:0"
        with open(stale, "wb") as f:
            f.write(bytes(4096))

        async def main():
            async with af.Engine("shm") as a, af.Engine("shm") as b:
                dst = np.zeros(4096, np.uint8)
                r = b.register(dst)
                s = a.register(np.full(4096, 7, np.uint8))
                await a.write(s[0:4096], r.descriptor()[0:4096], imm=5)
                await b.counter(5).wait(1, timeout=10)
                assert (dst == 7).all(), "data did not land"
            assert os.path.exists(stale), "a region that is not ours was removed"

        try:
            asyncio.run(main())
        finally:
            os.unlink(stale)
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
    assert out.stdout.strip().endswith("ok")


async def test_open_reclaims_what_dead_processes_left(anyio_backend):
    ns, dead, alive = _pidns(), _dead_pid(), os.getppid()
    tail = os.urandom(8).hex()
    stale_region = SHM / f"af-{ns:x}-{dead}-{tail}"
    kept = [
        SHM / f"af-{ns:x}-{alive}-{tail}",  # its process lives
        SHM / f"af-{ns + 1:x}-{dead}-{tail}",  # another pid namespace: its pid means nothing here
        SHM / f"{dead}:0:0",  # not an asyncfabric name
    ]
    stale_bell = SHM / f"asyncfabric-bell-{os.urandom(8).hex()}"
    live_bell = SHM / f"asyncfabric-bell-{os.urandom(8).hex()}"
    try:
        for p in (stale_region, *kept):
            p.write_bytes(bytes(4096))
        _bell(stale_bell, dead, ns)
        _bell(live_bell, alive, ns)
        async with af.Engine("shm") as eng:
            own = list(SHM.glob(f"af-{ns:x}-{os.getpid()}-*"))
            assert own, "the engine's region is not named af-<pidns>-<pid>-<random>"
            assert eng.address  # the engine works with its own name
        assert not stale_region.exists(), "a dead process's region was not reclaimed"
        assert not stale_bell.exists(), "a dead process's doorbell was not reclaimed"
        for p in (*kept, live_bell):
            assert p.exists(), f"{p.name} was removed but is not a dead process's"
        assert not [p for p in own if p.exists()], "the engine left its region behind on close"
    finally:
        for p in (stale_region, *kept, stale_bell, live_bell):
            p.unlink(missing_ok=True)


async def test_regions_of_one_process_do_not_collide(anyio_backend):
    async with af.Engine("shm", domains=2) as a, af.Engine("shm") as b:
        names = {bytes(x) for x in a.transport._addresses + b.transport._addresses}
        assert len(names) == 3
        n = 1 << 16
        dst = np.zeros(n, np.uint8)
        src = np.random.default_rng(3).integers(0, 256, n, dtype=np.uint8)
        r = a.register(dst)
        s = b.register(src)
        await b.write(s[0:n], r.descriptor()[0:n], imm=9)
        await a.counter(9).wait(r.expected_imms(n), timeout=10)
        assert np.array_equal(dst, src)


async def test_shm_engine_keeps_cma_unless_cuda_direct(anyio_backend):
    # shm turns CMA off for FI_HMEM endpoints (host memory then goes through bounce
    # buffers, copied on both sides): only cuda="direct" may ask for FI_HMEM.
    async with af.Engine("shm") as eng:
        assert not eng.transport.hmem
    async with af.Engine("shm", cuda="staged") as eng:
        assert not eng.transport.hmem
    async with af.Engine("shm", cuda="direct") as eng:
        assert eng.address  # asked for, granted or not by this build: the engine opens
