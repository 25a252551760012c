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

import contextlib
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from asyncfabric.testing.peer import PeerError, PeerProcess
from asyncfabric.testing.shmlock import QueueLockHolder, UnknownLayout

pytestmark = pytest.mark.anyio


def _holder(pid: int) -> QueueLockHolder:
    try:
        return QueueLockHolder(pid)
    except UnknownLayout:
        pytest.skip("the shm region is not libfabric 1.17's: the lock guard is off")


def _kill_later(pid: int, after_s: float) -> subprocess.Popen[bytes]:
    # Not a thread of ours: a poster stuck in C could hold the GIL.
    return subprocess.Popen(["sh", "-c", f"sleep {after_s}; kill -9 {pid}"])


@contextlib.asynccontextmanager
async def _locked_pair(peer_timeout: float) -> AsyncIterator[tuple[Any, ...]]:
    """A poster and a target process, a first write between them done (it maps the
    target's region in the poster), then the target's queue lock taken by a holder."""
    async with (
        PeerProcess("shm", peer_timeout=peer_timeout) as poster,
        PeerProcess("shm", peer_timeout=peer_timeout) as target,
    ):
        src, _ = await poster.alloc(1 << 16, seed=1)
        rid, desc = await target.alloc(1 << 16)
        await poster.call("write", src, desc, 0, 0, 8, 1, timeout=30)
        await target.wait(1, 1)
        assert target.pid is not None
        holder = _holder(target.pid)
        try:
            yield poster, target, src, rid, desc, holder
        finally:
            holder.kill()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    "op, size",
    [("write", 8), ("write", 65_536), ("pull", 8)],  # injected, completion-tracked, a read
)
async def test_post_to_peer_killed_holding_its_lock_fails(op, size):
    """The peer dies holding its own queue lock while a post waits for it."""
    async with _locked_pair(peer_timeout=30) as (poster, target, src, _, desc, _):
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


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_post_to_live_peer_whose_lock_a_dead_process_holds_fails_in_bound():
    """A third process took the live peer's lock and died: the bound ends the post."""
    async with _locked_pair(peer_timeout=1.0) as (poster, target, src, _, desc, holder):
        holder.kill()
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="queue lock stayed held"):
            await poster.call("write", src, desc, 0, 0, 8, 2, timeout=20)
        took = time.monotonic() - t0
        assert 0.9 < took < 6, took
        # the target itself is alive and answers; its engine still closes
        await target.call("stats", timeout=10)
        await target.call("exit", timeout=15)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_post_waits_for_a_live_holder_then_lands():
    """A live holder that lets go: the post goes through, and its data lands."""
    async with _locked_pair(peer_timeout=30) as (poster, target, src, rid, desc, holder):

        async def let_go() -> None:
            await anyio.sleep(0.3)
            await anyio.to_thread.run_sync(holder.unlock)

        async with anyio.create_task_group() as tg:
            tg.start_soon(let_go)
            await poster.call("write", src, desc, 0, 0, 1 << 16, 3, timeout=20)
        await target.wait(3, 1, timeout=10)
        assert await target.digest(rid, 0, 1 << 16) == await poster.digest(src, 0, 1 << 16)
        # The post from Python found the lock held and left the write queued
        # (ops.c, "Posts that would wait"); the progress thread posted it. A
        # write too large to inject: smaller ones post on (they end in the call).
        assert (await poster.call("stats", timeout=10))["qlock_defers"] >= 1
