"""``asyncfabric bench model``: per-operation costs measured here, and the throughput they
predict on real fabrics (docs/scale-model.md states the model and its assumptions).

asyncfabric bench model                          # measure, predict, check against this machine
asyncfabric bench model --workers 1,4,8 --batch 1,16,64 --json model.json
asyncfabric bench model --from-json model.json   # predict from costs measured earlier

Three steps, each usable from Python:

* :func:`measure` opens two shm engines in this process and isolates, in nanoseconds, the
  Python cost of a call (``py_call_ns``, ``py_batch_ns``, ``py_wait_ns``), the native cost of
  posting one piece (``post_ns``), the extra of a piece whose completion must be reaped
  (``complete_ns``), the receiver's cost per counted immediate (``count_ns``) and this
  machine's memcpy bandwidth (``copy_gbps``). The native costs come from *locked bursts*:
  the receiving engine's lock is held from Python (its progress thread stands aside, as it
  does for the benchmark's raw loop) while the sender posts a burst, so the post is timed
  alone; then the receiver's backlog is drained by the raw C loop
  (``asyncfabric.bench._raw.afr_wait``) and that drain is timed alone; for completion-tracked
  pieces the sender's lock is held too, and its completions are reaped and timed last.
* :func:`predict` turns costs into per-NIC and per-node throughput for a fabric
  (:data:`FABRICS`), worker count W, batch size B and message size, and names the limit
  that binds (sender CPU, receiver CPU, Python under the GIL, NICs in use, PCIe).
* :func:`check` measures this machine's own throughput for a few cells and compares it
  with the ``shm-here`` prediction.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KiB, MiB = 1 << 10, 1 << 20
SIZES: tuple[int, ...] = (4 * KiB, 64 * KiB, MiB, 16 * MiB)
WORKERS: tuple[int, ...] = (1, 4, 8)
BATCHES: tuple[int, ...] = (1, 16, 64)

BIG = 64 * KiB  # the second tracked size: the receiver's cost per byte (shm's CMA copy)
IMM, ACK = 7000, 7001  # immediates of the measurement engines (nothing else runs on them)
TIMEOUT_NS = 5_000_000_000

# ---------------------------------------------------------------- costs


@dataclass
class Costs:
    """Per-operation costs, in nanoseconds unless named otherwise (JSON: ``asdict``).

    The model uses the first eight fields; the rest say how they were obtained."""

    provider: str
    #: Python per ``await eng.write`` whose write finishes inside the call (8 B, injected),
    #: less ``post_ns``: argument checks, the route lookup, the cffi call, the lock.
    py_call_ns: float
    #: Python per ``await eng.write_many(batch)`` of a cached batch (one 8 B entry), less
    #: ``post_ns``: the same per call, for a batch.
    py_batch_ns: float
    #: main-thread CPU added to a call whose write must wait for its completion event
    #: (a waiter, the event loop's wake-up, the drain of the event), 64 calls in flight.
    py_wait_ns: float
    #: native cost per posted piece, injected (8 B: no copy worth counting).
    post_ns: float
    #: extra per completion-tracked piece: its post's extra over an injected one, plus
    #: the sender's reaping of its transmit completion.
    complete_ns: float
    #: receiver per counted immediate (8 B injected writes: read the CQ, count).
    count_ns: float
    #: this machine's memcpy bandwidth (numpy copy of 64 MiB), GB/s (10^9 B/s).
    copy_gbps: float
    inject_bytes: int = 0  # the provider's inject size here
    chunk_bytes: int = MiB  # the engines' chunk size (pieces per write: ceil(n / chunk))
    tracked_bytes: int = 0  # size of the completion-tracked pieces measured
    post_tracked_ns: float = 0.0  # native post of a tracked piece
    reap_ns: float = 0.0  # sender's reap per tracked piece
    recv_tracked_ns: float = 0.0  # receiver per tracked piece (shm: its CMA copy included)
    recv_big_ns: float = 0.0  # receiver per tracked piece of BIG bytes
    big_bytes: int = BIG
    post_stream_ns: float = 0.0  # one write_many of ~20,000 8 B entries, receiver running
    stream_eagain: int = 0  # EAGAINs during that write_many
    call_8b_ns: float = 0.0  # wall time of one ``await eng.write`` of 8 B
    batch_call_8b_ns: float = 0.0  # wall time of one ``await eng.write_many`` of one 8 B entry
    spread: dict[str, float] = field(default_factory=dict)  # (max - min) / median, per cost
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Costs:
        """Costs from :meth:`to_json`'s dict, or from a ``bench model --json`` file's."""
        d = d.get("costs", d)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def cma_gbps(self) -> float:
        """shm only: the receiver's copy rate for tracked pieces (its CMA system call), GB/s,
        from the two tracked sizes measured; the memcpy rate when they do not tell."""
        db = self.big_bytes - self.tracked_bytes
        dt = self.recv_big_ns - self.recv_tracked_ns
        return db / dt if db > 0 and dt > 0 else self.copy_gbps

    @property
    def shm_piece_ns(self) -> float:
        """shm only: the receiver's fixed cost per tracked piece beyond counting and its
        copy (the CMA system call itself)."""
        bw = self.cma_gbps
        copy = self.tracked_bytes / bw if bw > 0 else 0.0
        return max(0.0, self.recv_tracked_ns - self.count_ns - copy)


def _med(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _low(xs: Sequence[float], drop_below: float = 0.0) -> float:
    """The lower quartile of ``xs``: what a burst costs when nothing else took the CPU
    meanwhile (on a shared machine most slow bursts are preemptions). Values under
    ``drop_below`` x the median are dropped first: drains and reaps that the progress
    thread got into before the raw loop did (it then did part of the work)."""
    m = _med(xs)
    kept = sorted(x for x in xs if x >= drop_below * m) or sorted(xs)
    return float(kept[(len(kept) - 1) // 4])


def _spread(xs: Sequence[float]) -> float:
    m = _med(xs)
    return float((max(xs) - min(xs)) / m) if m > 0 else 0.0


class _Locks:
    """The engine lock of one engine, taken from Python through its native hook.

    ``afhook.h`` documents the lock (the progress thread never blocks on it: it stands
    aside while it is held). The core's cffi declares ``af_hook`` opaque, so its
    documented prefix is declared here, ABI mode, and checked by version."""

    _ffi: Any = None

    def __init__(self, transport: Any) -> None:
        from cffi import FFI

        from ..backends.libfabric.hook import native_hook

        if _Locks._ffi is None:
            f = FFI()
            f.cdef(
                "typedef struct { void *ep; void *cq; uint64_t inject; uint64_t max_msg; } "
                "mdl_dom; typedef struct { uint32_t version; uint32_t size; void *engine; "
                "int ndom; mdl_dom dom[16]; void (*lock)(void *e); void (*unlock)(void *e); } "
                "mdl_hook;"
            )
            _Locks._ffi = f
        self.native = native_hook(transport)
        self._h = _Locks._ffi.cast("mdl_hook *", self.native.hook)
        if self._h.version != 1:
            raise RuntimeError(f"native hook version {self._h.version}, this module knows 1")

    def lock(self) -> None:
        self._h.lock(self._h.engine)

    def unlock(self) -> None:
        self._h.unlock(self._h.engine)


def _raw_wait(native: Any, imm: int, n: int) -> int:
    """The raw C loop polls ``native``'s engine until ``n`` immediates ``imm`` arrived (it
    takes them); returns the nanoseconds that took."""
    from ._raw import ffi, lib

    el = ffi.new("uint64_t *")
    rc = lib.afr_wait(
        native.engine,
        native.hook,
        ffi.new("uint32_t[]", [imm]),
        ffi.new("uint64_t[]", [n]),
        1,
        TIMEOUT_NS,
        el,
    )
    if rc:
        raise RuntimeError(f"afr_wait: {rc}")
    return int(el[0])


def _meta() -> dict[str, Any]:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": platform.node(),
        "cpus": os.cpu_count() or 1,
        "python": platform.python_version(),
        "load": load,
    }


def copy_bandwidth(nbytes: int = 64 * MiB, reps: int = 5) -> float:
    """memcpy bandwidth here, GB/s of bytes copied (numpy ``copyto``; the best of ``reps``)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    np.copyto(dst, src)  # touch both
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        np.copyto(dst, src)
        best = min(best, time.perf_counter_ns() - t0)
    return nbytes / best


def _engine_kw(provider: str) -> dict[str, Any]:
    if provider != "shm":
        raise ValueError(
            f"measure() runs on shm only, not {provider!r}: its locked bursts need writes "
            "that land without the writer progressing (tcp's do not)"
        )
    return {"local_only": True}


async def measure_async(provider: str = "shm", quick: bool = True) -> Costs:
    """:func:`measure`, in a running event loop."""
    import asyncfabric as af

    kw = _engine_kw(provider)
    bursts = 15 if quick else 41
    calls = 5000 if quick else 20000
    stream_n = 20000
    # No wait-spin (a waiting call sleeps at once: what py_wait_ns measures is then the
    # event loop's path, not a spin), and a long stand-aside for a progress thread that
    # finds the lock taken (it then keeps away from a locked burst for its whole length).
    pol = af.ProgressPolicy(wait_spin_us=0.0, py_hold_us=5000.0)
    async with (
        af.Engine(provider, progress=pol, **kw) as a,
        af.Engine(provider, progress=pol, **kw) as b,
    ):
        inject = int(getattr(a.transport, "inject_size", 0))
        if inject < 8:
            raise ValueError(f"{provider} injects nothing here; measure() needs inject")
        tracked = inject + 8  # the smallest size past the inject size, 8-aligned
        top = 8 * MiB
        src = np.ones(top, np.uint8)
        dst = np.ones(top, np.uint8)
        abuf = np.ones(4096, np.uint8)
        ra, rb, rack = a.register(src), b.register(dst), a.register(abuf)
        db, dack = rb.descriptor(), rack.descriptor()
        a.connect(db)
        ack_peer = b.connect(dack).id
        la, lb = _Locks(a.transport), _Locks(b.transport)
        cb = b.counter(IMM)

        short = [0]  # bursts whose reap up to the ack did not reap every completion

        async def burst(size: int, k: int) -> tuple[list[float], list[float], list[float]]:
            """Locked bursts of ``k`` writes of ``size``: (the post call, in ns; the receiver's
            drain and the sender's reap, per piece), one value per burst."""
            from ._raw import lib as rawlib

            offs = (np.arange(k, dtype=np.uint64) * np.uint64(size)) % np.uint64(top - size)
            batch = af.Batch().add_many(ra, db, offs, offs, size, imm=IMM)
            await a.write_many(batch)  # warm-up: compile, route, first touch
            await cb.wait(k, timeout=5)
            injected = size <= inject
            posts, drains, reaps = [], [], []
            for _ in range(bursts):
                task: asyncio.Future[None] | None = None
                a_locked = False
                lb.lock()
                try:
                    t0 = time.perf_counter_ns()
                    if injected:
                        await a.write_many(batch)  # finishes inside the call
                    else:
                        task = asyncio.ensure_future(a.write_many(batch, timeout=5))
                        await asyncio.sleep(0)  # its first step: the post, then it waits
                    t1 = time.perf_counter_ns()
                    if task is not None:
                        la.lock()  # the sender's completions wait for us
                        a_locked = True
                finally:
                    lb.unlock()
                try:
                    drain = _raw_wait(lb.native, IMM, k)
                    if task is not None:
                        rc = rawlib.afr_send_imm(
                            lb.native.engine, lb.native.hook, ack_peer, dack.bases[0],
                            dack.keys[0], ACK, TIMEOUT_NS,
                        )  # fmt: skip
                        if rc:
                            raise RuntimeError(f"afr_send_imm: {rc}")
                finally:
                    if a_locked:
                        la.unlock()
                reap = 0
                if task is not None:
                    # the ack follows every completion the receiver wrote back: reaping
                    # up to it reaps them all
                    reap = _raw_wait(la.native, ACK, 1)
                    a.poll()
                    await asyncio.sleep(0)  # the batch's waiter resolves, if it was all reaped
                    if not task.done():
                        short[0] += 1  # some completion came after the ack: a short reap
                    await task
                b.poll()
                posts.append(float(t1 - t0))
                drains.append(drain / k)
                reaps.append(reap / k)
            return posts, drains, reaps

        k8, kt = 512, 256
        call8, drain8, _ = await burst(8, k8)
        callt, draint, reapt = await burst(tracked, kt)
        _, drainb, _ = await burst(BIG, 128)

        # one write_many of ~20,000 8 B entries, the receiver counting as it comes
        offs = np.arange(stream_n, dtype=np.uint64) * np.uint64(8)
        big = af.Batch().add_many(ra, db, offs, offs, 8, imm=IMM)
        await a.write_many(big, timeout=5)
        await cb.wait(stream_n, timeout=5)
        e0 = a.stats()["eagain"]
        t0 = time.perf_counter_ns()
        await a.write_many(big, timeout=5)
        stream_ns = (time.perf_counter_ns() - t0) / stream_n
        eagain = a.stats()["eagain"] - e0
        await cb.wait(stream_n, timeout=5)

        s8, d8 = ra[0:8], db[0:8]
        write, write_many = a.write, a.write_many

        async def calls_8b() -> float:
            t0 = time.perf_counter_ns()
            for _ in range(calls):
                await write(s8, d8, imm=IMM)
            dt = (time.perf_counter_ns() - t0) / calls
            await cb.wait(calls, timeout=5)
            return dt

        one = af.Batch().add(s8, d8, imm=IMM)

        async def batch_calls_8b() -> float:
            t0 = time.perf_counter_ns()
            for _ in range(calls):
                await write_many(one)
            dt = (time.perf_counter_ns() - t0) / calls
            await cb.wait(calls, timeout=5)
            return dt

        lanes = 64  # as the benchmark's streams: completions drain several at a time
        waits = max(20, calls // 10 // lanes)
        tslices = [(ra[i * tracked : (i + 1) * tracked], db[i * tracked : (i + 1) * tracked])
                   for i in range(lanes)]  # fmt: skip

        async def waited_calls() -> float:
            """Main-thread CPU per awaited write that waits for its completion, 64 in
            flight."""

            async def lane(k: int) -> None:
                s, d = tslices[k]
                for _ in range(waits):
                    await write(s, d, imm=IMM)

            t0 = time.thread_time_ns()
            await asyncio.gather(*(lane(k) for k in range(lanes)))
            dt = (time.thread_time_ns() - t0) / (waits * lanes)
            await cb.wait(waits * lanes, timeout=5)
            return dt

        await calls_8b()  # warm-up
        c8 = [await calls_8b() for _ in range(3)]
        bc8 = [await batch_calls_8b() for _ in range(3)]
        await waited_calls()
        cw = [await waited_calls() for _ in range(3)]

    # A burst's call is one write_many call (batch_call_8b: its Python and one post) plus
    # k - 1 more posts.
    bc = min(bc8)
    post8 = [(t - bc) / (k8 - 1) for t in call8]
    postt = [(t - bc) / (kt - 1) for t in callt]
    post, post_t = _low(post8), _low(postt)
    reap = _low(reapt, 0.25)
    c = Costs(
        provider=provider,
        py_call_ns=max(0.0, min(c8) - post),
        py_batch_ns=max(0.0, min(bc8) - post),
        py_wait_ns=max(0.0, min(cw) - min(c8) - (post_t - post)),
        post_ns=post,
        complete_ns=max(0.0, post_t - post) + reap,
        count_ns=_low(drain8, 0.25),
        copy_gbps=copy_bandwidth(reps=3 if quick else 7),
        inject_bytes=inject,
        chunk_bytes=int(a.chunk_bytes),
        tracked_bytes=tracked,
        post_tracked_ns=post_t,
        reap_ns=reap,
        recv_tracked_ns=_low(draint, 0.25),
        recv_big_ns=_low(drainb, 0.25),
        post_stream_ns=stream_ns,
        stream_eagain=int(eagain),
        call_8b_ns=min(c8),
        batch_call_8b_ns=min(bc8),
        spread={
            "post_ns": _spread(post8),
            "count_ns": _spread(drain8),
            "post_tracked_ns": _spread(postt),
            "reap_ns": _spread(reapt),
            "recv_tracked_ns": _spread(draint),
            "recv_big_ns": _spread(drainb),
            "call_8b_ns": _spread(c8),
            "batch_call_8b_ns": _spread(bc8),
            "waited_call_cpu_ns": _spread(cw),
        },
        meta={
            **_meta(),
            "quick": quick,
            "bursts": bursts,
            "calls": calls,
            "short_reaps": short[0],
        },  # fmt: skip
    )
    return c


def measure(provider: str = "shm", quick: bool = True) -> Costs:
    """Measure this machine's per-op costs on ``provider`` (shm), two engines in this
    process; each run is short (well under 2 s; about 3 s in all with ``quick``)."""
    return asyncio.run(measure_async(provider, quick))


# ---------------------------------------------------------------- fabrics and the model


@dataclass(frozen=True)
class Fabric:
    """What a node offers. Rates in GB/s (10^9 B/s); ``None``: no such limit."""

    name: str
    gpus: int  # GPUs (and GPU processes) per node
    nics_per_gpu: int
    nic_gbps: float | None  # line rate per NIC, GB/s
    pcie_gbps: float | None  # usable PCIe per GPU/NIC switch, GB/s
    inject_bytes: int | None  # writes up to this size are injected (None: the measured one)
    copy_bound: bool = False  # shm: a CPU copies every byte (no NIC)
    serial: bool = False  # sender and receiver take turns per piece (shm's queue lock)
    cores_per_gpu: int | None = None  # cores for workers (None: not a limit modelled)
    note: str = ""

    def line_gbps(self) -> float | None:
        return None if self.nic_gbps is None else self.nic_gbps * self.nics_per_gpu * self.gpus


# PCIe Gen5 x16: 32 GT/s x 16 lanes x 128/130 / 8 = 63.0 GB/s per direction; with 256 B
# payloads per TLP (~24 B of header and framing each) and DLLP/flow-control traffic,
# about 86 % of it carries data: 54 GB/s.
PCIE_GEN5_X16 = 54.0

FABRICS: dict[str, Fabric] = {
    "efa-p5": Fabric(
        "efa-p5", gpus=8, nics_per_gpu=4, nic_gbps=100 / 8, pcie_gbps=PCIE_GEN5_X16,
        inject_bytes=0, cores_per_gpu=12,
        note="32 x 100 Gbps EFA, 4 per GPU behind one PCIe Gen5 x16 switch per GPU",
    ),
    "cx7": Fabric(
        "cx7", gpus=8, nics_per_gpu=1, nic_gbps=400 / 8, pcie_gbps=PCIE_GEN5_X16,
        inject_bytes=0, cores_per_gpu=12,
        note="8 x 400 Gbps ConnectX-7, one per GPU, PCIe Gen5 x16 each",
    ),
    "shm-here": Fabric(
        "shm-here", gpus=1, nics_per_gpu=1, nic_gbps=None, pcie_gbps=None,
        inject_bytes=None, copy_bound=True, serial=True, cores_per_gpu=None,
        note="this machine, shm: the CPU copies every byte",
    ),
}  # fmt: skip

LIMITS = ("py", "send", "recv", "cpu", "gil", "nic", "pcie")
#: a cell's ``binding``: one of LIMITS. engines: "py" is the sender's limit when more than
#: half of it is the Python per call; workers: the one Python thread (calls and posts)


@dataclass
class Cell:
    """One prediction: a fabric, W workers per GPU, B messages per call, a size."""

    fabric: str
    design: str
    workers: int
    workers_eff: int  # the workers that can run at once (cores; workers: domains)
    batch: int
    size: int
    pieces: int
    tracked: bool
    send_ns: float  # sender CPU per message (Python, posts, reaps), one worker
    recv_ns: float  # receiver CPU per message, one worker
    nics_used: int  # NICs per GPU the workers' writes go over
    limits_gbps: dict[str, float]  # per GPU, each limit (absent: none)
    gbps_gpu: float
    gbps_nic: float  # per NIC (the GPU's share over all its NICs)
    gbps_node: float
    line_frac: float | None  # per node / node line rate
    binding: str


def _py_ns(c: Costs, batch: int, tracked: bool) -> float:
    """Python per call: ``await write`` for B = 1, ``await write_many`` above."""
    base = c.py_call_ns if batch == 1 else c.py_batch_ns
    return base + (c.py_wait_ns if tracked else 0.0)


DESIGNS = ("engines", "workers")
#: ``engines``: W workers, each a thread with an engine of its own (today's core: one
#: progress thread and one mutex per engine); each worker makes its own calls, so its
#: Python, posts and completions add up per message, and the W workers' Python shares the
#: process's GIL. ``workers``: one engine per GPU process, ``Engine(workers=W)``
#: (``backends/libfabric/workers.c``): one Python thread makes every call and posts, W
#: progress workers, each owning a group of the domains, reap and count in parallel.


def predict_cell(
    c: Costs,
    f: Fabric,
    workers: int,
    batch: int,
    size: int,
    gil: bool = True,
    design: str = "engines",
) -> Cell:
    """The model for one cell (docs/scale-model.md, "The equations")."""
    if workers < 1 or batch < 1 or size < 1:
        raise ValueError("workers, batch and size must be >= 1")
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {', '.join(DESIGNS)}, got {design!r}")
    inject = c.inject_bytes if f.inject_bytes is None else f.inject_bytes
    pieces = max(1, math.ceil(size / c.chunk_bytes))
    tracked = size > inject
    py = _py_ns(c, batch, tracked)
    reap = min(c.reap_ns, c.complete_ns) if tracked else 0.0
    post = c.post_ns + ((c.complete_ns - reap) if tracked else 0.0)  # the post call's part
    send = py / batch + pieces * (post + reap)  # all of the sender's CPU per message
    recv = pieces * c.count_ns
    if f.copy_bound:
        if tracked:  # the receiver copies it in (CMA), at its own rate and fixed cost
            recv += size / c.cma_gbps + pieces * c.shm_piece_ns
        else:  # copied twice through the queue's inject buffer: in by the sender, out
            send += size / c.copy_gbps
            recv += size / c.copy_gbps
    # workers that can run at once: one core each (a worker's threads take turns under
    # its engine lock); shm here: both sides are on this machine, two cores each; the
    # workers design: a worker owns one domain at least
    w = workers
    if f.copy_bound:
        w = min(w, max(1, (os.cpu_count() or 1) // 2))
    elif f.cores_per_gpu is not None:
        w = min(w, f.cores_per_gpu)
    if design == "workers":
        w = min(w, f.nics_per_gpu)
    limits: dict[str, float] = {}
    if f.serial:  # the two sides take turns: their costs add up per message
        limits["cpu"] = w * size / (send + recv)
    elif design == "engines":
        limits["send"] = w * size / send
        limits["recv"] = w * size / recv
    else:  # one Python thread calls and posts; the workers reap and count
        limits["py"] = size / (py / batch + pieces * post)
        if reap > 0:
            limits["send"] = w * size / (pieces * reap)
        limits["recv"] = w * size / recv
    if design == "engines" and gil and workers > 1 and py > 0:
        limits["gil"] = batch * size / py
    # NICs in use. engines: each worker owns nics/W of them (at least one); a single
    # write goes over min(pieces, its NICs) (piece i over domain i mod d: a one-piece
    # write always over the first), a batch stripes its entries over all of them.
    # workers (W > 1): each write's first piece goes to the next domain in turn.
    per_worker = max(1, f.nics_per_gpu // (workers if design == "engines" else 1))
    rotates = design == "workers" and w > 1
    stripe = per_worker if batch > 1 or rotates else min(pieces, per_worker)
    nics = min(f.nics_per_gpu, (workers if design == "engines" else 1) * stripe)
    if f.nic_gbps is not None:
        limits["nic"] = nics * f.nic_gbps
    if f.pcie_gbps is not None:
        limits["pcie"] = f.pcie_gbps
    binding = min(limits, key=lambda k: (limits[k], LIMITS.index(k)))
    gpu = limits[binding]
    if design == "engines" and binding == "send" and py / batch > send / 2:
        binding = "py"  # the sender's limit, most of it Python
    node = gpu * f.gpus
    line = f.line_gbps()
    return Cell(
        f.name, design, workers, w, batch, size, pieces, tracked, send, recv, nics, limits,
        gpu, gpu / f.nics_per_gpu, node, node / line if line else None, binding,
    )  # fmt: skip


def scale_native(costs: Costs, factor: float) -> Costs:
    """``costs`` with the native per-piece terms (post, complete, count) times ``factor``:
    a stand-in for a provider slower (or faster) per op than the one measured."""
    return dataclasses.replace(
        costs,
        post_ns=costs.post_ns * factor,
        complete_ns=costs.complete_ns * factor,
        count_ns=costs.count_ns * factor,
    )


def predict(
    costs: Costs,
    *,
    fabric: str | Fabric,
    workers: int | Sequence[int] = WORKERS,
    sizes: Sequence[int] = SIZES,
    batch: int | Sequence[int] = BATCHES,
    gil: bool = True,
    design: str = "engines",
) -> list[Cell]:
    """Predictions for every (W, B, size) of ``fabric`` (a name of :data:`FABRICS`)."""
    f = FABRICS[fabric] if isinstance(fabric, str) else fabric
    ws = [workers] if isinstance(workers, int) else list(workers)
    bs = [batch] if isinstance(batch, int) else list(batch)
    return [predict_cell(costs, f, w, b, s, gil, design) for w in ws for b in bs for s in sizes]


# ---------------------------------------------------------------- the check


@dataclass
class CheckRow:
    """One cell of this machine, predicted (``shm-here``, W = 1) and measured three ways:
    the API with the default progress policy, the API with ``ProgressPolicy.latency()``
    (engines that keep polling while busy, as the model's workers do), and the raw C
    loops on the same engines (both sides polling in C: the provider's own rate)."""

    what: str
    size: int
    batch: int
    lanes: int
    predicted_gbps: float
    binding: str
    default_gbps: float
    polling_gbps: float
    raw_gbps: float
    #: the same cell with every Python cost 0: what the raw loops are compared with
    native_gbps: float = math.nan
    #: CPU this process got while measuring, in cores (process CPU time / wall time):
    #: 2 here means both cores; less, that other work took them
    cores: dict[str, float] = field(default_factory=dict)

    def ratio(self, measured: float) -> float:
        return measured / self.predicted_gbps if self.predicted_gbps else math.nan

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("default", "polling"):
            d[f"ratio_{k}"] = self.ratio(d[f"{k}_gbps"])
        d["ratio_raw"] = self.raw_gbps / self.native_gbps if self.native_gbps else math.nan
        return d


CHECKS: tuple[tuple[str, int, int, int], ...] = (
    # what, size, entries per call (B), calls in flight
    ("write_many", 4 * KiB, 64, 2),
    ("write_many", 64 * KiB, 16, 2),
    ("await write", 64 * KiB, 1, 64),
)


async def _api_gbps(
    provider: str, policy: Any, size: int, batch: int, lanes: int, budget: float
) -> tuple[float, float]:
    """GB/s of ``lanes`` coroutines posting writes of ``size`` (``write_many`` of ``batch``
    entries, or ``await write`` for 1) for about ``budget`` s, end to end: the clock stops
    when the receiver has counted every immediate."""
    import asyncfabric as af

    kw = _engine_kw(provider)
    top = 32 * MiB
    async with (
        af.Engine(provider, progress=policy, **kw) as a,
        af.Engine(provider, progress=policy, **kw) as b,
    ):
        src, dst = np.ones(top, np.uint8), np.ones(top, np.uint8)
        ra, rb = a.register(src), b.register(dst)
        db = rb.descriptor()
        cb = b.counter(IMM)
        if batch > 1:
            offs = (np.arange(batch, dtype=np.uint64) * np.uint64(size)) % np.uint64(top - size)
            bt = af.Batch().add_many(ra, db, offs, offs, size, imm=IMM)

            async def post(k: int) -> None:
                del k  # every lane posts the same batch
                await a.write_many(bt, timeout=10)

        else:
            slices = [(ra[o : o + size], db[o : o + size]) for o in range(0, lanes * size, size)]

            async def post(k: int) -> None:
                s, d = slices[k]
                await a.write(s, d, imm=IMM, timeout=10)

        await post(0)  # warm-up
        await cb.wait(batch, timeout=5)
        n = 4 * lanes
        while True:
            per_lane = max(1, n // lanes)
            total = per_lane * lanes * batch
            waiter = asyncio.ensure_future(cb.wait(total, timeout=30))

            async def lane(k: int, per_lane: int = per_lane) -> None:
                for _ in range(per_lane):
                    await post(k)

            t0, c0 = time.perf_counter(), time.process_time()
            await asyncio.gather(*(lane(k) for k in range(lanes)))
            await waiter
            dt = time.perf_counter() - t0
            if dt >= budget / 3 or n >= 1 << 20:
                return total * size / dt / 1e9, (time.process_time() - c0) / dt
            n = int(n * min(64.0, max(2.0, budget / 2 / max(dt, 1e-6))))


async def _raw_gbps(provider: str, size: int, n_ops: int) -> tuple[float, float]:
    """The raw C loops on two engines of this process: the sender's ``afr_stream`` (64
    writes in flight) on this thread, the receiver's ``afr_wait`` on another; both poll."""
    import threading

    import asyncfabric as af

    from ..backends.libfabric.hook import native_hook
    from ._raw import ffi, lib

    kw = _engine_kw(provider)
    top = 32 * MiB
    async with af.Engine(provider, **kw) as a, af.Engine(provider, **kw) as b:
        src, dst = np.ones(top, np.uint8), np.ones(top, np.uint8)
        ra, rb = a.register(src), b.register(dst)
        db = rb.descriptor()
        peer = a.connect(db).id
        ha, hb = native_hook(a.transport), native_hook(b.transport)
        k = max(1, min(512, top // size))
        passes = max(1, n_ops // k)
        offs = (np.arange(k, dtype=np.uint64) * np.uint64(size)) % np.uint64(top - size)
        lens = np.full(k, size, np.uint64)
        keep = (ffi.new("uint32_t[]", [peer]), ffi.new("uint64_t[]", [db.bases[0]]),
                ffi.new("uint64_t[]", [db.keys[0]]))  # fmt: skip
        el, el2 = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        rcs: list[int] = []

        def recv(count: int) -> None:
            rcs.append(
                lib.afr_wait(hb.engine, hb.hook, ffi.new("uint32_t[]", [IMM]),
                             ffi.new("uint64_t[]", [count]), 1, TIMEOUT_NS, el2)
            )  # fmt: skip

        def send(npasses: int) -> int:
            return int(
                lib.afr_stream(
                    ha.engine, ha.hook, keep[0], 1, 1, ffi.cast("void *", src.ctypes.data),
                    ra._reg.handle, ffi.from_buffer("uint64_t[]", offs),
                    ffi.from_buffer("uint64_t[]", offs), ffi.from_buffer("uint64_t[]", lens),
                    ffi.NULL, ffi.NULL, k, IMM, keep[1], keep[2], npasses, 64, -1, 0,
                    TIMEOUT_NS, el,
                )
            )  # fmt: skip

        gbps = cores = 0.0
        for npasses in (1, passes):  # a warm-up pass, then the timed run
            th = threading.Thread(target=recv, args=(k * npasses,))
            th.start()
            t0, c0 = time.perf_counter(), time.process_time()
            rc = send(npasses)
            th.join()
            dt = time.perf_counter() - t0
            if rc or any(rcs):
                raise RuntimeError(f"raw loops failed: {rc}, {rcs}")
            cores = (time.process_time() - c0) / dt
            a.poll()
            b.poll()
            gbps = k * npasses * size / dt / 1e9
        return gbps, cores


async def check_async(costs: Costs, quick: bool = True) -> list[CheckRow]:
    """:func:`check`, in a running event loop (prints nothing)."""
    import asyncfabric as af

    budget = 0.3 if quick else 1.0  # seconds per measured point, about
    f = FABRICS["shm-here"]
    out: list[CheckRow] = []
    raw: dict[int, tuple[float, float]] = {}
    no_python = dataclasses.replace(costs, py_call_ns=0.0, py_batch_ns=0.0, py_wait_ns=0.0)
    for what, size, batch, lanes in CHECKS:
        cell = predict_cell(costs, f, 1, batch, size)
        native = predict_cell(no_python, f, 1, batch, size)
        dflt = await _api_gbps(costs.provider, af.ProgressPolicy(), size, batch, lanes, budget)
        poll = await _api_gbps(
            costs.provider, af.ProgressPolicy.latency(), size, batch, lanes, budget
        )
        if size not in raw:
            per_op = cell.send_ns + cell.recv_ns
            n_ops = int(min(1 << 20, max(2048, budget * 1e9 / max(per_op, 1.0))))
            raw[size] = await _raw_gbps(costs.provider, size, n_ops)
        label = f"{what} of {batch}" if batch > 1 else f"{what}, {lanes} in flight"
        cores = {"default": dflt[1], "polling": poll[1], "raw": raw[size][1]}
        out.append(
            CheckRow(label, size, batch, lanes, cell.gbps_gpu, cell.binding, dflt[0], poll[0],
                     raw[size][0], native.gbps_gpu, {k: round(v, 2) for k, v in cores.items()})
        )  # fmt: skip
    return out


def check(costs: Costs, quick: bool = True, file: Any = None) -> list[CheckRow]:
    """Measure write_many at 4 KiB and 64 KiB and ``await write`` at 64 KiB on this machine
    (shm, two engines in this process; about 3 s with ``quick``), print them beside the
    ``shm-here`` prediction from ``costs``, and return them."""
    rows = asyncio.run(check_async(costs, quick))
    print(render_check(rows), file=file or sys.stdout)
    return rows


# ---------------------------------------------------------------- rendering


def _human(n: int) -> str:
    for unit, k in (("MiB", MiB), ("KiB", KiB)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n} B"


def render_costs(c: Costs) -> str:
    m = c.meta
    lines = [
        f"costs on {c.provider} ({m.get('host', '?')}, {m.get('cpus', '?')} CPUs, load "
        f"{m.get('load', '?')}, {m.get('date', '?')}):",
        f"  py_call_ns   {c.py_call_ns:8.1f}  Python per `await write` (8 B, injected), "
        f"less post_ns (call: {c.call_8b_ns:.0f})",
        f"  py_batch_ns  {c.py_batch_ns:8.1f}  Python per `await write_many` (cached batch), "
        f"less post_ns (call: {c.batch_call_8b_ns:.0f})",
        f"  py_wait_ns   {c.py_wait_ns:8.1f}  main-thread CPU added by waiting for a completion",
        f"  post_ns      {c.post_ns:8.1f}  native post per injected piece (locked bursts of 512)",
        f"  complete_ns  {c.complete_ns:8.1f}  extra per tracked piece: post "
        f"{c.post_tracked_ns:.0f} - {c.post_ns:.0f}, reap {c.reap_ns:.0f} "
        f"({c.tracked_bytes} B pieces)",
        f"  count_ns     {c.count_ns:8.1f}  receiver per counted immediate (drain of 512)",
        f"  copy_gbps    {c.copy_gbps:8.2f}  memcpy, 64 MiB",
        f"  (shm receiver per tracked piece: {c.recv_tracked_ns:.0f} ns at {c.tracked_bytes} B, "
        f"{c.recv_big_ns:.0f} at {_human(c.big_bytes)}: CMA {c.cma_gbps:.2f} GB/s + "
        f"{c.shm_piece_ns:.0f} ns a piece; write_many of 20,000 x 8 B, receiver "
        f"running: {c.post_stream_ns:.1f} ns/entry, {c.stream_eagain} EAGAIN; inject "
        f"{c.inject_bytes} B, chunk {_human(c.chunk_bytes)})",
    ]
    if c.spread:
        worst = max(c.spread, key=lambda k: c.spread[k])
        lines.append(f"  spread (max-min)/median over repeats: worst {worst} {c.spread[worst]:.2f}")
    return "\n".join(lines)


def render_cells(cells: list[Cell]) -> str:
    """One table per fabric and design: rows W x B, a column per size; a cell is the
    per-node GB/s, the per-NIC GB/s in parentheses and the binding limit."""
    out: list[str] = []
    for fname, design in dict.fromkeys((c.fabric, c.design) for c in cells):
        cs = [c for c in cells if c.fabric == fname and c.design == design]
        f = FABRICS.get(fname)
        sizes = list(dict.fromkeys(c.size for c in cs))
        line = f.line_gbps() if f else None
        head = f"{fname}, design {design}" + (f": {f.note}" if f else "")
        if line:
            head += f"; line {line:.0f} GB/s per node"
        out.append(head)
        out.append("GB/s per node (per NIC) and the binding limit")
        hdr = f"{'W':>3} {'B':>3} | " + " | ".join(f"{_human(s):>22}" for s in sizes)
        out.append(hdr)
        out.append("-" * len(hdr))
        for w, b in dict.fromkeys((c.workers, c.batch) for c in cs):
            row = {c.size: c for c in cs if c.workers == w and c.batch == b}
            txt = []
            for s in sizes:
                c = row[s]
                txt.append(f"{c.gbps_node:7.1f} ({c.gbps_nic:6.2f}) {c.binding:>4}")
            weff = {c.workers_eff for c in row.values()}
            note = f"  (W runs as {weff.pop()})" if weff != {w} and len(weff) == 1 else ""
            out.append(f"{w:>3} {b:>3} | " + " | ".join(f"{t:>22}" for t in txt) + note)
        out.append("")
    out.append(
        "limits: py = the sender's Python (engines: most of the send limit; workers: the one "
        "Python thread, calls and posts); send/recv = sender/receiver CPU x W; cpu = both "
        "sides in turn (shm); gil = the Python of a GPU's W engines, one at a time; nic = "
        "NICs in use x line rate; pcie = the GPU/NIC switch link"
    )
    return "\n".join(out)


def render_check(rows: list[CheckRow]) -> str:
    lines = [
        "check: shm here, one worker. GB/s predicted (shm-here) and measured, the ratio",
        "measured/predicted, and the cores this process got meanwhile (of 2 here).",
        "default: the API, default policy; polling: the API, ProgressPolicy.latency();",
        "native: the prediction without Python, against which raw (the C loops) is compared",
        f"{'what':<26} {'size':>6} {'predicted':>9} | {'default':>16} | {'polling':>16} | "
        f"{'native':>6} | {'raw':>16}",
    ]
    for r in rows:

        def m(g: float, ref: float, k: str, r: CheckRow = r) -> str:
            return f"{g:5.2f} {g / ref if ref else math.nan:4.2f} {r.cores.get(k, math.nan):4.2f}c"

        lines.append(
            f"{r.what:<26} {_human(r.size):>6} {r.predicted_gbps:>9.2f} | "
            f"{m(r.default_gbps, r.predicted_gbps, 'default'):>16} | "
            f"{m(r.polling_gbps, r.predicted_gbps, 'polling'):>16} | {r.native_gbps:>6.2f} | "
            f"{m(r.raw_gbps, r.native_gbps, 'raw'):>16}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def _ints(text: str) -> list[int]:
    try:
        v = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"need integers >= 1, got {text!r}")
    return v


def _sizes(text: str) -> list[int]:
    """``4K,64K,1M`` -> bytes (as ``bench --sizes``; parsed here: cli.py imports this)."""
    mult = {"K": KiB, "M": MiB, "G": 1 << 30}
    out = []
    for x in text.split(","):
        t = x.strip().upper().removesuffix("B")
        if not t:
            continue
        try:
            n = int(float(t[:-1]) * mult[t[-1]]) if t[-1] in mult else int(t)
        except (ValueError, KeyError):
            raise argparse.ArgumentTypeError(f"not a size: {x!r} (examples: 4K, 1M)") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"sizes must be >= 1 byte, got {x!r}")
        out.append(n)
    if not out:
        raise argparse.ArgumentTypeError(f"no sizes in {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    """``asyncfabric bench model``."""
    from .._cli import CliParser

    p = CliParser(
        prog="asyncfabric bench model",
        description="Measure per-op costs here (shm, two engines in this process), predict "
        "throughput on EFA (p5) and ConnectX-7 nodes, and check the model against this "
        "machine. docs/scale-model.md explains the model.",
    )
    p.add_argument("--from-json", help="costs from an earlier --json (skip measuring)")
    p.add_argument("--workers", type=_ints, default=list(WORKERS), help="W list (1,4,8)")
    p.add_argument("--batch", type=_ints, default=list(BATCHES), help="B list (1,16,64)")
    p.add_argument(
        "--sizes", type=_sizes, default=list(SIZES), help="message sizes (4K,64K,1M,16M)"
    )
    p.add_argument(
        "--fabrics", default=",".join(FABRICS), help=f"comma-separated: {', '.join(FABRICS)}"
    )
    p.add_argument("--provider", default="shm", help="where to measure (shm)")
    p.add_argument("--full", action="store_true", help="longer measurements (default: quick)")
    p.add_argument("--no-check", action="store_true", help="skip measuring this machine")
    p.add_argument("--no-gil", action="store_true", help="workers do not share a GIL")
    p.add_argument(
        "--designs",
        default=",".join(DESIGNS),
        help="engines (W engines, today's threading), workers (one engine, "
        "Engine(workers=W)); the NIC fabrics get one table each",
    )
    p.add_argument(
        "--native-factor",
        type=float,
        default=1.0,
        help="multiply post_ns, complete_ns and count_ns by this for the NIC fabrics (their "
        "providers' costs are not measured here; shm's stand in)",
    )
    p.add_argument("--json", help="write costs, predictions and the check to this file")
    a = p.parse_args(argv)
    fabrics = [x.strip() for x in a.fabrics.split(",") if x.strip()]
    bad = [x for x in fabrics if x not in FABRICS]
    if bad or not fabrics:
        p.error(f"unknown --fabrics {', '.join(bad) or '(none)'}; choose from {', '.join(FABRICS)}")
    if a.from_json:
        with open(a.from_json) as fh:
            costs = Costs.from_json(json.load(fh))
    else:
        costs = measure(a.provider, quick=not a.full)
    print(render_costs(costs))
    print()
    if a.native_factor <= 0:
        p.error("--native-factor must be > 0")
    scaled = scale_native(costs, a.native_factor)
    if a.native_factor != 1:
        print(f"NIC fabrics: post_ns, complete_ns, count_ns x {a.native_factor:g}\n")
    designs = [x.strip() for x in a.designs.split(",") if x.strip()]
    if not designs or any(d not in DESIGNS for d in designs):
        p.error(f"--designs: choose from {', '.join(DESIGNS)}")
    cells: list[Cell] = []
    for fname in fabrics:
        f = FABRICS[fname]
        for design in designs[:1] if f.copy_bound else designs:
            cells += predict(
                costs if f.copy_bound else scaled, fabric=fname, workers=a.workers,
                sizes=a.sizes, batch=a.batch, gil=not a.no_gil, design=design,
            )  # fmt: skip
    print(render_cells(cells))
    rows: list[CheckRow] = []
    if not a.no_check:
        print()
        rows = check(costs, quick=not a.full)
    if a.json:
        doc = {
            "costs": costs.to_json(),
            "predictions": [dataclasses.asdict(c) for c in cells],
            "check": [r.to_json() for r in rows],
            "native_factor": a.native_factor,
            "meta": {**_meta(), "argv": ["asyncfabric", "bench", "model", *(argv or [])]},
        }
        with open(a.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    return 0
