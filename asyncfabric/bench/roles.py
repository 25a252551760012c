"""What the benchmark workers do: one async function per role, run inside a worker.

Each role gets the worker's :class:`State` and plain keyword arguments, and
returns plain data (per-repeat durations in ns, or round-trip times). The
``af_*`` roles use asyncfabric's public ``await`` API with O(1) Python work per
operation; the ``raw_*`` roles do the same work through the C loops of
:mod:`asyncfabric.bench._raw` (_rawloop.c), driving the same engines and
registrations through the libfabric backend's native hook; the peer roles live
in :mod:`asyncfabric.bench.peers`.

Every repeat ends with the receiver acknowledging (a zero-byte write with the
``ack`` immediate) once it has counted everything, and the sender's clock stops
when the acknowledgement arrives: the time covers delivery, not just posting.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from .. import Batch, Descriptor, Engine, ProgressPolicy
from .peers import *  # noqa: F403 (the peer roles are roles too)
from .peers import PeerState

TIMEOUT_S = 60.0
BATCH_MAX = 4096  # writes per write_many call in the batch streams
POLICIES = {
    "default": ProgressPolicy,
    "latency": ProgressPolicy.latency,
    "low_cpu": ProgressPolicy.low_cpu,
}


class State(PeerState):
    def __init__(self) -> None:
        super().__init__()
        self.engines: list[Engine] = []
        self.regions: list[Any] = []
        self.remote: list[Descriptor] = []

    async def close_engines(self) -> None:
        for r in self.regions:
            try:
                r.close()
            except Exception:
                pass
        for e in self.engines:
            await e.aclose()
        self.engines, self.regions, self.remote = [], [], []

    async def close(self) -> None:
        await self.close_engines()
        await super().close()


# ---------------------------------------------------------------- setup


async def open_engines(
    st: State,
    provider: str,
    count: int = 1,
    domains: int = 1,
    nbytes: int = 4096,
    policy: str = "default",
    node: str | None = None,
    device: str = "cpu",
    workers: int = 1,
    cpus: list[int] | None = None,
) -> list[bytes]:
    """Open ``count`` engines, each with one registered, pre-faulted region; return descriptors.

    ``device`` other than cpu: the regions are CUDA tensors on that device. ``workers``
    and ``cpus``: the engines' progress workers and where they are pinned."""
    await st.close_engines()
    kw: dict[str, Any] = {"domains": domains, "progress": POLICIES[policy](),
                          "workers": workers, "cpus": cpus}  # fmt: skip
    if node:
        kw["node"] = node
    if device != "cpu":
        import torch

        torch.cuda.set_device(torch.device(device))
    for _ in range(count):
        eng = await Engine.open(provider, **kw)
        if device != "cpu":
            buf = torch.ones(max(nbytes, 64), dtype=torch.uint8, device=device)
        else:
            buf = np.ones(max(nbytes, 64), np.uint8)  # touch every page before timing
        st.engines.append(eng)
        st.regions.append(eng.register(buf))
    return [bytes(r.descriptor()) for r in st.regions]


async def pin(st: State, cpus: list[int]) -> None:
    """Run this worker process (its threads too) on ``cpus`` only."""
    import os

    os.sched_setaffinity(0, cpus)


async def connect(st: State, descs: list[bytes]) -> dict[str, Any]:
    """Learn the other side's descriptors and insert their addresses (warm-up of the AV)."""
    st.remote = [Descriptor.from_bytes(b) for b in descs]
    for eng in st.engines:
        for d in st.remote:
            eng.connect(d)
    t = st.engines[0].transport
    info = getattr(t, "info", None) or [{"tx_credits": 256}]  # cuda_ipc has no libfabric info
    return {
        "provider": t.provider,
        "backend": t.backend,
        "tx_credits": info[0]["tx_credits"],
        "inject_size": t.inject_size,
        "cuda_path": str(getattr(t, "cuda_path", "") or ""),
    }


async def close_engines(st: State) -> None:
    await st.close_engines()


def _reps(warmup: int, reps: int) -> range:
    return range(warmup + reps)


# ---------------------------------------------------------------- streams (write, fanout, scale, domains)


async def af_stream_send(
    st: State,
    size: int,
    iters: int,
    targets: int,
    window: int,
    imm: int,
    ack: int,
    reps: int,
    warmup: int = 1,
    slots: int = 1,
) -> list[int]:
    """Post ``iters`` writes of ``size`` bytes round-robin over ``targets`` receivers,
    ``window`` in flight (one coroutine per lane, each awaiting its writes in turn);
    write j moves slot ``j % slots`` of the source to the same slot of the target."""
    eng, src = st.engines[0], st.regions[0]
    srcs = [src[k * size : (k + 1) * size] for k in range(slots)]
    dsts = [[d[k * size : (k + 1) * size] for k in range(slots)] for d in st.remote[:targets]]
    ntg = len(dsts)
    ackc = eng.counter(ack)
    write = eng.write
    lanes = max(1, min(window, iters))

    async def lane(k: int) -> None:
        for j in range(k, iters, lanes):
            await write(srcs[j % slots], dsts[j % ntg][j % slots], imm=imm)

    out = []
    for r in _reps(warmup, reps):
        t0 = time.perf_counter_ns()
        if lanes == 1:
            await lane(0)
        else:
            await asyncio.gather(*(lane(k) for k in range(lanes)))
        await ackc.wait(ntg, timeout=TIMEOUT_S)
        dt = time.perf_counter_ns() - t0
        if r >= warmup:
            out.append(dt)
    return out


async def batch_stream_send(
    st: State,
    size: int,
    iters: int,
    targets: int,
    window: int,
    imm: int,
    ack: int,
    reps: int,
    warmup: int = 1,
    slots: int = 1,
) -> list[int]:
    """The same stream as ``af_stream_send`` through ``write_many``: the writes are
    built once into batches of at most BATCH_MAX (round-robin over the receivers),
    and each repeat posts them, two batches in flight when there are several."""
    eng, src = st.engines[0], st.regions[0]
    dsts = st.remote[:targets]
    ntg = len(dsts)
    ackc = eng.counter(ack)
    batches = []
    for lo in range(0, iters, BATCH_MAX):
        hi = min(iters, lo + BATCH_MAX)
        b = Batch()
        for t in range(ntg):
            k = len(range(lo + (t - lo) % ntg, hi, ntg))  # writes j in [lo, hi), j % ntg == t
            if k:
                js = np.arange(lo + (t - lo) % ntg, hi, ntg, dtype=np.uint64)
                offs = (js % np.uint64(slots)) * np.uint64(size)
                b.add_many(src, dsts[t], offs, offs, size, imm=imm)
        batches.append(b)
    lanes = min(2, len(batches))
    write_many = eng.write_many

    async def lane(k: int) -> None:
        for j in range(k, len(batches), lanes):
            await write_many(batches[j], timeout=TIMEOUT_S)

    out = []
    for r in _reps(warmup, reps):
        t0 = time.perf_counter_ns()
        if lanes == 1:
            await lane(0)
        else:
            await asyncio.gather(*(lane(k) for k in range(lanes)))
        await ackc.wait(ntg, timeout=TIMEOUT_S)
        dt = time.perf_counter_ns() - t0
        if r >= warmup:
            out.append(dt)
    return out


async def af_stream_recv(
    st: State, per_engine: int, imm: int, ack: int, reps: int, warmup: int = 1
) -> None:
    """Each engine waits for its immediates, then acknowledges."""
    ackd = st.remote[0]

    async def one(eng: Engine) -> None:
        c = eng.counter(imm)
        for _ in _reps(warmup, reps):
            await c.wait(per_engine, timeout=TIMEOUT_S)
            await eng.write_imm(ackd, ack, timeout=TIMEOUT_S)

    await asyncio.gather(*(one(e) for e in st.engines))


BACKGROUND_IMM = 0xC0000000  # far above the runner's measured immediates (from 1000 up)


async def arm_background(st: State, counters: int) -> None:
    """Keep ``counters - 1`` more counters live on every engine (armed in the native
    table for a count that never comes, as a server's outstanding requests would
    be) until the engines close. A step of its own, before any clock starts:
    64 engines x 9,999 arms take longer than a warm-up repeat."""
    for eng in st.engines:
        t = eng.transport
        for i in range(counters - 1):
            t.counter_arm(BACKGROUND_IMM + i, 1 << 62)


def _raw(eng: Engine) -> tuple[Any, Any, Any]:
    """The raw module's (ffi, lib) and ``eng``'s native hook (keep it while the loop runs)."""
    from ..backends.libfabric.hook import native_hook
    from ._raw import ffi, lib

    return ffi, lib, native_hook(eng.transport)


def _raw_targets(ffi: Any, eng: Engine, descs: list[Descriptor], ndom: int) -> tuple[Any, Any, Any]:
    ids, bases, keys = [], [], []
    for d in descs:
        ids.append(eng.connect(d).id)
        bases += list(d.bases[:ndom])
        keys += list(d.keys[:ndom])
    return (
        ffi.new("uint32_t[]", ids),
        ffi.new("uint64_t[]", bases),
        ffi.new("uint64_t[]", keys),
    )


def _check(rc: int, what: str) -> None:
    if rc:
        from ..backends.libfabric import strerror

        raise RuntimeError(f"raw {what} failed: {strerror(rc)} ({rc})")


async def raw_stream_send(
    st: State,
    size: int,
    iters: int,
    targets: int,
    window: int,
    imm: int,
    ack: int,
    reps: int,
    warmup: int = 1,
    pages: list[list[int]] | None = None,
    dst_stride: int = 0,
) -> list[int]:
    """The same stream as af_stream_send (or one paged write) in _rawloop.c's loop."""
    eng, src = st.engines[0], st.regions[0]
    ffi, lib, hk = _raw(eng)
    descs = st.remote[:targets]
    ndom = min(eng.domains, len(descs[0].bases))
    ids, bases, keys = _raw_targets(ffi, eng, descs, ndom)
    if pages is not None:
        sp = np.asarray(pages[0], np.uint64) * np.uint64(size)
        dp = np.asarray(pages[1], np.uint64) * np.uint64(dst_stride or size)
        lens = np.full(len(sp), size, np.uint64)
        peer = np.zeros(len(sp), np.uint32)
    else:
        chunk = descs[0].chunk_bytes
        nch = max(1, -(-size // chunk))
        off = np.arange(nch, dtype=np.uint64) * np.uint64(chunk)
        ln = np.minimum(np.uint64(size) - off, np.uint64(chunk)) if size else np.zeros(1, np.uint64)
        sp = np.tile(off, iters)
        dp = sp.copy()
        lens = np.tile(ln, iters)
        peer = np.repeat(np.arange(iters, dtype=np.uint32) % np.uint32(len(descs)), nch)
    cast = ffi.from_buffer
    ptr = ffi.cast("void *", src.ptr)
    mr = src.registration.handle
    el = ffi.new("uint64_t *")
    out = []
    for r in _reps(warmup, reps):
        rc = lib.afr_stream(
            hk.engine, hk.hook, ids, len(descs), ndom, ptr, mr,
            cast("uint64_t[]", sp), cast("uint64_t[]", dp), cast("uint64_t[]", lens),
            cast("uint32_t[]", peer), ffi.NULL, len(sp), imm, bases, keys, 1, window,
            ack, len(descs), int(TIMEOUT_S * 1e9), el,
        )  # fmt: skip
        _check(rc, "stream")
        eng.poll()
        if r >= warmup:
            out.append(int(el[0]))
    return out


async def raw_stream_recv(
    st: State, per_engine: int, imm: int, ack: int, reps: int, warmup: int = 1
) -> None:
    ackd = st.remote[0]
    raws = [_raw(e) for e in st.engines]
    ffi = raws[0][0]
    imms = ffi.new("uint32_t[]", [imm])
    cnt = ffi.new("uint64_t[]", [per_engine])
    el = ffi.new("uint64_t *")
    peers = [e.connect(ackd).id for e in st.engines]
    tmo = int(TIMEOUT_S * 1e9)
    for _ in _reps(warmup, reps):
        for eng, (_, lib, hk), pid in zip(st.engines, raws, peers):
            _check(lib.afr_wait(hk.engine, hk.hook, imms, cnt, 1, tmo, el), "wait")
            _check(
                lib.afr_send_imm(hk.engine, hk.hook, pid, ackd.bases[0], ackd.keys[0], ack, tmo),
                "ack",
            )
            eng.poll()


async def torch_copy_send(
    st: State, size: int, iters: int, src: str, dst: str, reps: int, warmup: int = 1
) -> list[int]:
    """The CUDA baseline: ``iters`` copies of ``size`` bytes by torch, ``src`` to ``dst``
    device in this process (a peer copy between GPUs), timed with CUDA events."""
    import torch

    a = torch.ones(max(size, 1), dtype=torch.uint8, device=src)
    b = torch.empty(max(size, 1), dtype=torch.uint8, device=dst)
    cur = torch.cuda.current_stream(a.device if a.is_cuda else b.device)
    out = []
    for r in _reps(warmup, reps):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record(cur)
        for _ in range(iters):
            b.copy_(a, non_blocking=True)
        t1.record(cur)
        t1.synchronize()
        if r >= warmup:
            out.append(int(t0.elapsed_time(t1) * 1e6))
    return out


# ---------------------------------------------------------------- paged


async def af_paged_send(
    st: State,
    size: int,
    pages: list[list[int]],
    dst_stride: int,
    imm: int,
    ack: int,
    reps: int,
    warmup: int = 1,
) -> list[int]:
    eng, src = st.engines[0], st.regions[0]
    dst = st.remote[0]
    sp = np.asarray(pages[0], np.uint64)
    dp = np.asarray(pages[1], np.uint64)
    ackc = eng.counter(ack)
    out = []
    for r in _reps(warmup, reps):
        t0 = time.perf_counter_ns()
        await eng.write_paged(src, dst, sp, dp, page_size=size, dst_stride=dst_stride, imm=imm)
        await ackc.wait(1, timeout=TIMEOUT_S)
        dt = time.perf_counter_ns() - t0
        if r >= warmup:
            out.append(dt)
    return out


async def batch_paged_send(
    st: State,
    size: int,
    pages: list[list[int]],
    dst_stride: int,
    imm: int,
    ack: int,
    reps: int,
    warmup: int = 1,
) -> list[int]:
    """The paged point as a Batch of pages (``add_pages``), built once, posted per repeat."""
    eng, src = st.engines[0], st.regions[0]
    b = Batch().add_pages(src, st.remote[0], pages[0], pages[1], page_size=size,
                          dst_stride=dst_stride, imm=imm)  # fmt: skip
    ackc = eng.counter(ack)
    out = []
    for r in _reps(warmup, reps):
        t0 = time.perf_counter_ns()
        await eng.write_many(b, timeout=TIMEOUT_S)
        await ackc.wait(1, timeout=TIMEOUT_S)
        dt = time.perf_counter_ns() - t0
        if r >= warmup:
            out.append(dt)
    return out


# ---------------------------------------------------------------- pingpong


async def af_pingpong(
    st: State, initiator: bool, size: int, iters: int, ping: int, pong: int, reps: int = 1,
    warmup: int = 1,
) -> list[int]:  # fmt: skip
    """WriteImm, then await the peer's WriteImm back: Python (await) on both sides per op."""
    eng, src = st.engines[0], st.regions[0]
    s, d = src[:size], st.remote[0][:size]
    mine, theirs = (ping, pong) if initiator else (pong, ping)
    inbox = eng.counter(theirs)
    write, wait = eng.write, inbox.wait
    clock = time.perf_counter_ns
    n = iters * (reps + warmup)
    rtts = [0] * n
    if initiator:
        for i in range(n):
            t0 = clock()
            await write(s, d, imm=mine)
            await wait(1, timeout=TIMEOUT_S)
            rtts[i] = clock() - t0
    else:
        for _ in range(n):
            await wait(1, timeout=TIMEOUT_S)
            await write(s, d, imm=mine)
    return rtts[iters * warmup :] if initiator else []


async def raw_pingpong(
    st: State, initiator: bool, size: int, iters: int, ping: int, pong: int, reps: int = 1,
    warmup: int = 1,
) -> list[int]:  # fmt: skip
    eng, src = st.engines[0], st.regions[0]
    ffi, lib, hk = _raw(eng)
    d = st.remote[0]
    mine, theirs = (ping, pong) if initiator else (pong, ping)
    n = iters * (reps + warmup)
    rtt = ffi.new("uint64_t[]", n)
    rc = lib.afr_pingpong(
        hk.engine, hk.hook, int(initiator), eng.connect(d).id, ffi.cast("void *", src.ptr),
        src.registration.handle, size, d.bases[0], d.keys[0], mine, theirs, n, rtt,
        int(TIMEOUT_S * 1e9),
    )  # fmt: skip
    _check(rc, "pingpong")
    eng.poll()
    return list(rtt)[iters * warmup :] if initiator else []
