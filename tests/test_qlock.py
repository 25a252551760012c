"""A shm peer whose queue lock is held: a post waits outside libfabric and ends.

libfabric 1.17's shm provider keeps a process-shared spin lock in each endpoint's
region; a post to the peer takes it. A process SIGKILLed while holding it leaves it
held for good, and a post that reached the provider then spun forever (a CI run hung
so). Here another process takes the peer's lock on purpose, as a dying process
would have, and the poster, itself a separate process so that a hang fails the test
instead of hanging it, must end: with PeerUnreachable once the peer is gone or the
bound passed, or with the write done once a live holder lets go.
"""

from __future__ import annotations

import glob
import subprocess
import sys
import time

import pytest

from asyncfabric.testing.peer import PeerError, PeerProcess

pytestmark = pytest.mark.anyio

# Takes the spin lock of the shm region at argv[1] (libfabric 1.17's struct
# smr_region: version byte 4 at offset 0, the lock at offset 24), says so, then holds
# it until stdin closes or says "unlock".
_HOLDER = r"""
import ctypes, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 4096)
if m[0] != 4:
    print("layout", flush=True)
    sys.exit(0)
lock = ctypes.addressof(ctypes.c_char.from_buffer(m)) + 24
libc = ctypes.CDLL(None)
libc.pthread_spin_lock(ctypes.c_void_p(lock))
print("locked", flush=True)
if sys.stdin.readline().strip() == "unlock":
    libc.pthread_spin_unlock(ctypes.c_void_p(lock))
    print("unlocked", flush=True)
    sys.stdin.readline()
"""


def _region_of(pid: int) -> str:
    found = glob.glob(f"/dev/shm/af-*-{pid}-*")
    assert len(found) == 1, f"expected one shm region of process {pid}, found {found}"
    return found[0]


class _Holder:
    """A process that holds the queue lock of `pid`'s shm region."""

    def __init__(self, pid: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, _region_of(pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        said = self.proc.stdout.readline().strip()
        if said == "layout":
            pytest.skip("the shm region is not libfabric 1.17's: the lock guard is off")
        assert said == "locked", said

    def unlock(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("unlock\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "unlocked"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _kill_later(pid: int, after_s: float) -> subprocess.Popen[bytes]:
    # Not a thread of ours: a poster stuck in C could hold the GIL.
    return subprocess.Popen(["sh", "-c", f"sleep {after_s}; kill -9 {pid}"])


async def _setup(peer_timeout: float):
    poster = PeerProcess("shm", peer_timeout=peer_timeout)
    target = PeerProcess("shm", peer_timeout=peer_timeout)
    await poster.__aenter__()
    await target.__aenter__()
    src, _ = await poster.alloc(1 << 16, seed=1)
    rid, desc = await target.alloc(1 << 16)
    # a first write maps the target's region in the poster (before its lock is taken)
    await poster.call("write", src, desc, 0, 0, 8, 1, timeout=30)
    await target.wait(1, 1)
    return poster, target, src, rid, desc


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    "op, size",
    [("write", 8), ("write", 65_536), ("pull", 8)],  # injected, completion-tracked, a read
)
async def test_post_to_peer_killed_holding_its_lock_fails(op, size):
    """The peer dies holding its own queue lock while a post waits for it."""
    poster, target, src, _, desc = await _setup(peer_timeout=30)
    assert target.pid is not None
    holder = _Holder(target.pid)
    try:
        killer = _kill_later(target.pid, 0.5)
        t0 = time.monotonic()
        args = (src, desc, 0, 0, size) + ((2,) if op == "write" else ())
        with pytest.raises(PeerError, match="process has exited"):
            await poster.call(op, *args, timeout=20)
        took = time.monotonic() - t0
        killer.wait()
        # the lock is still held: only the peer's exit could end the wait, far
        # inside the 30 s peer_timeout
        assert 0.4 < took < 10, took
    finally:
        holder.kill()
        await poster.aclose()
        await target.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_post_to_live_peer_whose_lock_a_dead_process_holds_fails_in_bound():
    """A third process took the live peer's lock and died: the bound ends the post."""
    poster, target, src, _, desc = await _setup(peer_timeout=1.0)
    assert target.pid is not None
    holder = _Holder(target.pid)
    holder.kill()
    try:
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="queue lock stayed held"):
            await poster.call("write", src, desc, 0, 0, 8, 2, timeout=20)
        took = time.monotonic() - t0
        assert 0.9 < took < 6, took
        # the target itself is alive and answers; its engine still closes
        await target.call("stats", timeout=10)
        await target.call("exit", timeout=15)
    finally:
        await poster.aclose()
        await target.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_post_waits_for_a_live_holder_then_lands():
    """A live holder that lets go: the post goes through, and its data lands."""
    poster, target, src, rid, desc = await _setup(peer_timeout=30)
    assert target.pid is not None
    holder = _Holder(target.pid)
    try:
        import anyio

        async def let_go() -> None:
            await anyio.sleep(0.3)
            await anyio.to_thread.run_sync(holder.unlock)

        async with anyio.create_task_group() as tg:
            tg.start_soon(let_go)
            await poster.call("write", src, desc, 0, 0, 4096, 3, timeout=20)
        await target.wait(3, 1, timeout=10)
        assert await target.digest(rid, 0, 4096) == await poster.digest(src, 0, 4096)
    finally:
        holder.kill()
        await poster.aclose()
        await target.aclose()
