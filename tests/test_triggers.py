"""Triggered writes and counter release words on real providers (shm, tcp).

A trigger is a write or batch armed against a host word; the native watcher posts it
when the word reaches the armed value (here the word is written from Python or from
another thread, standing in for a CUDA stream's cuStreamWriteValue32). A release word
is stored by the native counter table when n arrivals are counted (here polled from
Python, standing in for cuStreamWaitValue32). Data is verified at a peer process.
The CUDA glue (asyncfabric.cuda_memops) is tested at the end, where CUDA exists.
"""

from __future__ import annotations

import threading
import time

import anyio
import numpy as np
import pytest

import asyncfabric as af
from asyncfabric.testing.peer import PeerProcess, random_bytes, sha256

pytestmark = pytest.mark.anyio

CHUNK = 1 << 16


async def _eventually(cond, timeout: float = 10.0) -> None:
    """Poll ``cond()`` until it holds (a bound, not a timing assertion)."""
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.002)


async def test_armed_write_fires_on_the_word_and_not_before(provider, kw, anyio_backend):
    async with (
        PeerProcess(provider, chunk_bytes=CHUNK, **kw) as peer,
        af.Engine(provider, **kw) as eng,
    ):
        n = 3 * CHUNK + 7
        data = random_bytes(n, seed=11)
        src = eng.register(data)
        rid, db = await peer.alloc(n)
        d = af.Descriptor.from_bytes(db)
        flag = af.Flag()
        flag.set(0xFFFFFFF0)  # behind 0x10 in the cyclic compare: not reached
        t = eng.arm_write(src, d, flag, 0x10, imm=1)
        await anyio.sleep(0.05)
        flag.set(0x0F)
        await anyio.sleep(0.1)
        assert not t.done() and t.fires == 0
        assert await peer.call("count", 1) == 0, "the armed write went out before its word"
        flag.set(0x10)
        with anyio.fail_after(10):
            await t
        assert t.done() and t.fires == 1
        await peer.wait(1, d.expected_imms(n))
        assert await peer.digest(rid, 0, n) == sha256(data)
        # a word already past the value fires at once
        t2 = eng.arm_write(src[:8], d[:8], flag, 0x0C, imm=2)
        with anyio.fail_after(10):
            await t2
        await peer.wait(2, 1)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_armed_batch_to_two_peers_fired_from_another_thread(provider, kw):
    async with (
        PeerProcess(provider, chunk_bytes=CHUNK, **kw) as p1,
        PeerProcess(provider, chunk_bytes=CHUNK, **kw) as p2,
        af.Engine(provider, **kw) as eng,
    ):
        n = 1 << 20
        data = random_bytes(2 * n, seed=12)
        src = eng.register(data)
        r1, b1 = await p1.alloc(n)
        r2, b2 = await p2.alloc(n)
        d1, d2 = af.Descriptor.from_bytes(b1), af.Descriptor.from_bytes(b2)
        batch = af.Batch().add(src[:n], d1, imm=3).add(src[n:], d2, imm=4).add_imm(d1, 5)
        flag = af.Flag(np.zeros(4, np.uint32), offset=8)  # a word inside a caller's buffer
        t = eng.arm(batch, flag, 1)
        await anyio.sleep(0.05)
        assert await p1.call("count", 3) == 0 and await p2.call("count", 4) == 0
        threading.Timer(0.05, flag.set, (1,)).start()
        with anyio.fail_after(10):
            await t.wait()
        await p1.wait(3, d1.expected_imms(n))
        await p2.wait(4, d2.expected_imms(n))
        await p1.wait(5, 1)
        assert await p1.digest(r1, 0, n) == sha256(data, 0, n)
        assert await p2.digest(r2, 0, n) == sha256(data, n, n)
        # the same batch stays postable by write_many meanwhile and after
        await eng.write_many(batch)
        await p1.wait(5, 1)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_triggers_and_release_words_with_several_workers(provider, kw):
    """Workers own the domains (workers.c): the watcher's post goes through their
    locks and queue, and the workers count the arrivals a release word takes."""
    async with (
        PeerProcess(provider, domains=2, chunk_bytes=CHUNK, **kw) as peer,
        af.Engine(provider, domains=2, workers=2, **kw) as eng,
    ):
        n = 8 * CHUNK
        data = random_bytes(n, seed=18)
        src = eng.register(data)
        rid, db = await peer.alloc(n)
        d = af.Descriptor.from_bytes(db)
        flag, ready = af.Flag(), af.Flag()
        land = np.zeros(64, np.uint8)
        back = bytes(eng.register(land).descriptor())
        rel = eng.counter(16).release_word(3, ready, 1)
        t = eng.arm_write(src, d, flag, 1, imm=15)
        flag.set(1)
        with anyio.fail_after(10):
            await t
        await peer.wait(15, d.expected_imms(n))
        assert await peer.digest(rid, 0, n) == sha256(data)
        for _ in range(3):
            await peer.call("write", rid, back, 0, 0, 8, 16)
        await _eventually(lambda: ready.value == 1)
        assert rel.fired == 1


async def test_repeating_trigger_resets_its_word(provider, kw, anyio_backend):
    async with (
        PeerProcess(provider, **kw) as peer,
        af.Engine(provider, **kw) as eng,
    ):
        src = eng.register(random_bytes(64, seed=13))
        _, db = await peer.alloc(64)
        d = af.Descriptor.from_bytes(db)
        flag = af.Flag()
        t = eng.arm_write(src, d, flag, 1, imm=6, reset=0, repeat=True)
        for k in range(1, 6):
            flag.set(1)  # as a captured CUDA graph would: the same value every replay
            with anyio.fail_after(10):
                await t.wait(k)
            assert flag.value == 0  # the watcher reset it before posting
        assert t.fires == 5 and not t.done()
        await peer.wait(6, 5)
        assert t.disarm() is True
        assert t.done()
        flag.set(1)
        await anyio.sleep(0.1)
        assert await peer.call("count", 6) == 0 and flag.value == 1  # disarmed: nothing fired
        with pytest.raises(af.TriggerDisarmed):
            await t.wait(6)


async def test_release_word_is_stored_exactly_at_n_arrivals(provider, kw, anyio_backend):
    async with (
        PeerProcess(provider, **kw) as peer,
        af.Engine(provider, **kw) as eng,
    ):
        rid, _ = await peer.alloc(64, 1)
        buf = np.zeros(64, np.uint8)
        desc = bytes(eng.register(buf).descriptor())
        flag = af.Flag()
        c = eng.counter(7)
        rel = c.release_word(4, flag, 0xABCD)
        with pytest.raises(RuntimeError, match="release word armed"):
            await c.wait(1)
        with pytest.raises(RuntimeError, match="already"):
            c.release_word(1, af.Flag(), 1)
        for _ in range(3):
            await peer.call("write", rid, desc, 0, 0, 8, 7)
        await _eventually(lambda: c.count == 3)
        await anyio.sleep(0.05)
        assert flag.value == 0 and rel.fired == 0 and not rel.done()
        await peer.call("write", rid, desc, 0, 0, 8, 7)
        await _eventually(lambda: flag.value == 0xABCD)
        assert c.count == 0  # the release word took the four
        assert rel.fired == 1 and rel.done()
        # one-shot: done, so the counter is Python's again
        await peer.call("write", rid, desc, 0, 0, 8, 7)
        with anyio.fail_after(10):
            await c.wait(1)
        # repeating, the GPU way: the waiter resets the word after each release
        g = af.Flag()
        rel2 = eng.counter_flag(8, 2, g, 1, repeat=True)
        for k in range(1, 4):
            await peer.call("write", rid, desc, 0, 0, 8, 8)
            await anyio.sleep(0.02)
            assert g.value == 0
            await peer.call("write", rid, desc, 0, 0, 8, 8)
            await _eventually(lambda: g.value == 1)
            g.set(0)
            assert rel2.fired == k
        await peer.call("write", rid, desc, 0, 0, 8, 8)
        await _eventually(lambda: eng.counter(8).count == 1)
        assert rel2.disarm() == 3 and rel2.done()
        assert eng.counter(8).count == 1  # what it did not take stays counted
        with anyio.fail_after(10):
            await eng.counter(8).wait(1)


async def test_release_word_counts_what_arrived_before_it(provider, kw, anyio_backend):
    async with (
        PeerProcess(provider, **kw) as peer,
        af.Engine(provider, **kw) as eng,
    ):
        rid, _ = await peer.alloc(8, 1)
        desc = bytes(eng.register(np.zeros(8, np.uint8)).descriptor())
        for _ in range(5):
            await peer.call("write", rid, desc, 0, 0, 8, 9)
        await _eventually(lambda: eng.counter(9).count == 5)
        flag = af.Flag()
        rel = eng.counter(9).release_word(3, flag, 2)
        assert flag.value == 2 and rel.fired == 1  # stored inside the arm call
        assert eng.counter(9).count == 2


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_release_word_counts_staged_credits(provider, kw):
    """A staged target's immediates are credited after its host-to-device copy (not
    counted off the wire): the release word is stored then, and the data is there."""
    torch = pytest.importorskip("torch")
    from asyncfabric.testing.peer import register_staged

    async with af.Engine(provider, **kw) as a, af.Engine(provider, **kw) as b:
        n = 3 << 20
        data = random_bytes(n, seed=17)
        src = a.register(data)
        land = torch.zeros(n, dtype=torch.uint8)
        dst = register_staged(b, land)
        flag = af.Flag()
        rel = b.counter(14).release_word(dst.expected_imms(n), flag, 5)
        await a.write(src, dst.descriptor(), imm=14)
        await _eventually(lambda: flag.value == 5)
        assert rel.fired == 1
        assert sha256(land.numpy()) == sha256(data)


async def test_disarm_and_close(provider, kw, anyio_backend):
    async with PeerProcess(provider, **kw) as peer:
        _, db = await peer.alloc(64)
        d = af.Descriptor.from_bytes(db)
        eng = await af.Engine.open(provider, **kw)
        try:
            src = eng.register(random_bytes(64, seed=14))
            flag = af.Flag()
            t = eng.arm_write(src, d, flag, 1, imm=10)
            assert t.disarm() is True and t.done()
            assert t.disarm() is False  # once
            flag.set(1)
            await anyio.sleep(0.1)
            assert await peer.call("count", 10) == 0
            with pytest.raises(af.TriggerDisarmed):
                await t
            # a fired one-shot trigger is not disarmed any more
            t2 = eng.arm_write(src, d, flag, 1, imm=11)
            with anyio.fail_after(10):
                await t2
            assert t2.disarm() is False
            # close: armed triggers fail with EngineClosed; release words go
            t3 = eng.arm_write(src, d, af.Flag(), 1, imm=12)
            t4 = eng.arm(af.Batch().add_imm(d, 12), af.Flag(), 1, repeat=True)
            rel = eng.counter(13).release_word(1, af.Flag(), 1)
            src.close()  # deferred: armed triggers hold the region
        finally:
            await eng.aclose()
        for t in (t3, t4):
            with pytest.raises(af.EngineClosed):
                await t.wait()
            assert t.done()
        assert rel.done()
        assert await peer.call("count", 12) == 0


async def test_dead_peer_fails_armed_triggers(provider, kw, anyio_backend):
    timeout = 3.0
    async with af.Engine(provider, peer_timeout=timeout, **kw) as eng:
        victim = PeerProcess(provider, **kw)
        await victim.__aenter__()
        try:
            _, db = await victim.alloc(64)
            d = af.Descriptor.from_bytes(db)
            src = eng.register(random_bytes(64, seed=15))
            await eng.write(src, d, imm=1)  # connected and watched
            t = eng.arm_write(src, d, af.Flag(), 1, imm=2)
            rep = eng.arm_write(src, d, af.Flag(), 1, imm=2, repeat=True)
            victim.kill()
            t0 = time.monotonic()
            for trig in (t, rep):
                with anyio.fail_after(timeout + 10):
                    with pytest.raises(af.PeerUnreachable):  # one write: as write() fails
                        await trig.wait()
            assert time.monotonic() - t0 < timeout + 5
            assert t.done() and rep.done()
        finally:
            await victim.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_bad_input_is_refused_clearly(provider, kw):
    with pytest.raises(af.RegionError, match="needs 4 bytes"):
        af.Flag(bytearray(2))
    with pytest.raises(af.RegionError, match="needs 4 bytes"):
        af.Flag(np.zeros(2, np.uint32), offset=8)
    with pytest.raises(ValueError, match="multiple of 4"):
        af.Flag(bytearray(8), offset=2)
    with pytest.raises(af.RegionError, match="read-only"):
        af.Flag(b"12345678")
    with pytest.raises(ValueError, match="outside"):
        af.Flag().set(1 << 32)
    async with (
        PeerProcess(provider, **kw) as peer,
        af.Engine(provider, **kw) as eng,
    ):
        _, db = await peer.alloc(64)
        d = af.Descriptor.from_bytes(db)
        src = eng.register(random_bytes(64, seed=16))
        f = af.Flag()
        with pytest.raises(TypeError, match="Flag"):
            eng.arm_write(src, d, np.zeros(1, np.uint32), 1)
        with pytest.raises(ValueError, match="outside"):
            eng.arm_write(src, d, f, -1)
        with pytest.raises(ValueError, match="outside"):
            eng.arm_write(src, d, f, 1 << 32)
        with pytest.raises(TypeError, match="value"):
            eng.arm_write(src, d, f, True)
        with pytest.raises(ValueError, match="reset"):
            eng.arm_write(src, d, f, 1, reset=1 << 40)
        with pytest.raises(ValueError, match="reset 1 has already reached value 1"):
            eng.arm_write(src, d, f, 1, reset=1, repeat=True)  # would refire forever
        with pytest.raises(ValueError, match="empty"):
            eng.arm(af.Batch(), f, 1)
        with pytest.raises(ValueError, match="bytes"):
            eng.arm_write(src[:8], d[:16], f, 1)
        with pytest.raises(ValueError, match="n must be"):
            eng.counter(1).release_word(0, f, 1)
        with pytest.raises(ValueError, match="outside"):
            eng.counter(1).release_word(1, f, 1 << 32)
        with pytest.raises(TypeError, match="Flag"):
            eng.counter_flag(1, 1, 1234, 1)
        with pytest.raises(af.Unsupported, match="cuda_ipc"):
            eng.peer_word(d)  # a signal word needs a peer's GPU memory mapped here
        with pytest.raises(af.RegionError, match="aligned"):
            eng.peer_word(d[2:8])
        with pytest.raises(af.RegionError, match="needs 4 bytes"):
            eng.peer_word(d[:2])
        with pytest.raises(TypeError, match="Descriptor"):
            eng.peer_word(src)
        src.close()
        with pytest.raises(af.RegionError, match="unregistered"):
            eng.arm_write(src, d, f, 1)
        assert f.value == 0
    with pytest.raises(af.EngineClosed):
        eng.arm_write(src, d, f, 1)


# ---------------------------------------------------------------- CUDA (skips without it)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def test_cuda_memops_refuse_plain_flags_without_a_gpu():
    """Importable everywhere; a host flag is refused before any CUDA call."""
    from asyncfabric import cuda_memops

    with pytest.raises(af.TransferError, match="cuda_flag"):
        cuda_memops.stream_fire(af.Flag(), 1)
    with pytest.raises(af.TransferError, match="cuda_flag"):
        cuda_memops.stream_wait(af.Flag(), 1)
    with pytest.raises(TypeError, match="Flag"):
        cuda_memops.stream_wait(object(), 1)  # type: ignore[arg-type]


@pytest.mark.skipif(not _cuda(), reason="needs torch with a CUDA device")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_cuda_stream_fires_and_waits():
    """A CUDA stream fires an armed write (cuStreamWriteValue32) and waits on the peer
    counter's release word (cuStreamWaitValue32 GEQ), the host only arming."""
    import torch

    from asyncfabric import cuda_memops

    async with af.Engine("shm") as a, af.Engine("shm") as b:
        dev = torch.zeros(1024, dtype=torch.float32, device="cuda")
        host = torch.zeros(1024, dtype=torch.float32).pin_memory()
        land = torch.zeros(1024, dtype=torch.float32).pin_memory()
        src, dst = a.register(host), b.register(land)
        fire, ready = cuda_memops.cuda_flag(), cuda_memops.cuda_flag()
        t = a.arm_write(src, dst.descriptor(), fire, 1, imm=21)
        rel = b.counter(21).release_word(1, ready, 1)
        s = torch.cuda.current_stream()
        dev.fill_(3.0)
        host.copy_(dev, non_blocking=True)
        cuda_memops.stream_fire(fire, 1, s)
        cuda_memops.stream_wait(ready, 1, s)
        out = torch.empty(1024, device="cuda")
        out.copy_(land, non_blocking=True)
        with anyio.fail_after(10):
            await t
        await anyio.to_thread.run_sync(s.synchronize)
        assert rel.fired == 1
        assert torch.all(out == 3.0)


async def _replay_pair(ga, gb, sa, sb, rounds: int, unstick) -> None:
    """Replay b's graph then a's, ``rounds`` times, and wait for a's stream to end;
    ``unstick()`` lets streams stuck on a word go (so the process can end) before the
    timeout is raised."""
    import torch

    for _ in range(rounds):
        with torch.cuda.stream(sb):
            gb.replay()
        with torch.cuda.stream(sa):
            ga.replay()
    end = torch.cuda.Event()
    end.record(sa)
    try:
        await _eventually(end.query, timeout=60)
    finally:
        if not end.query():
            unstick()


def _recurrence(n_el: int, p: int, rounds: int) -> np.ndarray:
    """The graphs' data after ``rounds``: x -> (x + 1) * 3 * 2, mod p, on the host."""
    want = np.arange(n_el, dtype=np.int64) % p
    for _ in range(rounds):
        want = (((want + 1) % p) * 3 % p) * 2 % p
    return want


@pytest.mark.skipif(not _cuda(), reason="needs torch with a CUDA device")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_cuda_ipc_graph_compute_trigger_wait_compute_1000_rounds():
    """Issue 18's graph: one captured CUDA graph per side, replayed 1,000 times, each
    round compute -> GPU-triggered GPU-to-GPU write (cuda_ipc: the stream copies, the
    watcher posts the immediate) -> wait on the peer counter's release word ->
    compute. The host only arms and launches; the data is a modular recurrence
    checked against the same recurrence on the host."""
    import dataclasses

    import torch

    from asyncfabric import cuda_memops as cm

    p, n_el, rounds = 1_000_003, 256, 1000
    pol = dataclasses.replace(af.ProgressPolicy.latency(), trigger_spin_us=float("inf"))
    async with (
        af.Engine("cuda_ipc", progress=pol) as a,
        af.Engine("cuda_ipc", progress=pol) as b,
    ):
        z = {
            k: torch.zeros(n_el, dtype=torch.int64, device="cuda") for k in ("sa", "la", "sb", "lb")
        }
        x = torch.arange(n_el, dtype=torch.int64, device="cuda") % p
        ra, la = a.register(z["sa"]), a.register(z["la"])
        rb, lb = b.register(z["sb"]), b.register(z["lb"])
        fa, fb, ready_a, ready_b = (cm.cuda_flag() for _ in range(4))
        ta = a.arm_write(ra, lb.descriptor(), fa, 1, imm=31, reset=0, repeat=True)
        tb = b.arm_write(rb, la.descriptor(), fb, 1, imm=32, reset=0, repeat=True)
        n = lb.descriptor().expected_imms(n_el * 8)
        rel_b = b.counter(31).release_word(n, ready_b, 1, repeat=True)
        rel_a = a.counter(32).release_word(n, ready_a, 1, repeat=True)
        sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
        torch.cuda.synchronize()
        ga, gb = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(ga, stream=sa):
            z["sa"].copy_(torch.remainder(x + 1, p))  # compute
            cm.stream_fire(ta)  # the copy into b's memory, then the word
            cm.stream_wait(ready_a, 1)  # until b's answer was counted here
            cm.stream_fire(ready_a, 0)
            x.copy_(torch.remainder(z["la"] * 2, p))  # compute
        with torch.cuda.graph(gb, stream=sb):
            cm.stream_wait(ready_b, 1)
            cm.stream_fire(ready_b, 0)
            z["sb"].copy_(torch.remainder(z["lb"] * 3, p))
            cm.stream_fire(tb)
        await _replay_pair(
            ga, gb, sa, sb, rounds, lambda: [f.set(1 << 30) for f in (ready_a, ready_b)]
        )
        await _eventually(lambda: ta.fires == rounds and tb.fires == rounds)
        assert (x.cpu().numpy() == _recurrence(n_el, p, rounds)).all()
        assert (rel_a.fired, rel_b.fired) == (rounds, rounds)


@pytest.mark.skipif(not _cuda(), reason="needs torch with a CUDA device")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_cuda_ipc_signal_words_graph_1000_rounds():
    """GPU to GPU with no host in the loop: each side's graph computes, fires its
    trigger (the copy into the peer's memory), stores the round into the peer's
    signal word (Engine.peer_word) and waits on its own, in GPU memory. The
    immediates still reach the host counters. Data checked as in the graph above."""
    import dataclasses

    import torch

    from asyncfabric import cuda_memops as cm

    p, n_el, rounds = 1_000_003, 256, 1000
    pol = dataclasses.replace(af.ProgressPolicy.latency(), trigger_spin_us=float("inf"))
    async with (
        af.Engine("cuda_ipc", progress=pol) as a,
        af.Engine("cuda_ipc", progress=pol) as b,
    ):
        z = {
            k: torch.zeros(n_el, dtype=torch.int64, device="cuda") for k in ("sa", "la", "sb", "lb")
        }
        sig = {k: torch.zeros(16, dtype=torch.int32, device="cuda") for k in ("a", "b")}
        x = torch.arange(n_el, dtype=torch.int64, device="cuda") % p
        ra, la, siga = a.register(z["sa"]), a.register(z["la"]), a.register(sig["a"])
        rb, lb, sigb = b.register(z["sb"]), b.register(z["lb"]), b.register(sig["b"])
        fa, fb = cm.cuda_flag(), cm.cuda_flag()
        ta = a.arm_write(ra, lb.descriptor(), fa, 1, imm=41, reset=0, repeat=True)
        tb = b.arm_write(rb, la.descriptor(), fb, 1, imm=42, reset=0, repeat=True)
        to_b, to_a = a.peer_word(sigb.descriptor()), b.peer_word(siga.descriptor())
        sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
        torch.cuda.synchronize()
        ga, gb = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(ga, stream=sa):
            z["sa"].copy_(torch.remainder(x + 1, p))
            cm.stream_fire(ta)  # the copy into b's memory (and the immediate's word)
            cm.stream_fire(to_b, 1)  # then b's signal word, behind a fence
            cm.stream_wait(sig["a"], 1)  # until b's answer is here
            cm.stream_fire(sig["a"], 0)
            x.copy_(torch.remainder(z["la"] * 2, p))
        with torch.cuda.graph(gb, stream=sb):
            cm.stream_wait(sig["b"], 1)
            cm.stream_fire(sig["b"], 0)
            z["sb"].copy_(torch.remainder(z["lb"] * 3, p))
            cm.stream_fire(tb)
            cm.stream_fire(to_a, 1)
        await _replay_pair(ga, gb, sa, sb, rounds, lambda: [w.fill_(1 << 30) for w in sig.values()])
        assert (x.cpu().numpy() == _recurrence(n_el, p, rounds)).all()
        n = lb.descriptor().expected_imms(n_el * 8)
        await _eventually(lambda: ta.fires == rounds and tb.fires == rounds)
        await _eventually(
            lambda: b.counter(41).count >= rounds * n and a.counter(42).count >= rounds * n
        )
