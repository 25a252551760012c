"""GPU-triggered writes and counter release words on the GPU machine (issue 18).

Two processes on one GPU (cuda:0; start CUDA MPS first: ``nvidia-cuda-mps-control -d``),
engines on shm. Each side arms, once, a repeating trigger (its pinned send buffer to
the peer's pinned receive buffer, fired by ``cuStreamWriteValue32`` on its ``fire``
flag) and a repeating release word (the counter of the peer's immediate stores 1
into its ``ready`` flag, which its stream waits on with ``cuStreamWaitValue32`` GEQ).
The host only arms and launches; no host sync and no host function is on the path.

1. ``graph``: one CUDA graph per side, captured once and replayed ``--iters`` times.
   Rank 0: compute -> D2H into the send buffer -> fire -> wait on ready -> reset ready
   -> H2D of the reply -> compute. Rank 1 answers each round (wait, compute, fire).
   The data is a modular recurrence: the final state and a running checksum are
   checked against the same recurrence computed on the host.
2. ``latency``: 8 B GPU -> GPU ping-pong, one-way = RTT / 2, per round from CUDA
   events on rank 0's stream: (a) GPU-triggered (as above, eager launches), (b) host
   sync + ``await eng.write`` + ``await counter.wait`` on both sides.

Prints JSON lines (``--out DIR`` also writes DIR/gpu_triggers.jsonl):

    nvidia-cuda-mps-control -d
    python benchmarks/gpu_triggers.py --out /tmp/triggers
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

P = 1_000_003  # the recurrence's modulus
L = 1024  # int64 elements per graph round (8 KiB)
IMM_G, IMM_T, IMM_H = 0x7A01, 0x7A02, 0x7A03
TIMEOUT = 60.0

_lines: list[str] = []


def emit(**row: Any) -> None:
    line = json.dumps(row)
    _lines.append(line)
    print(line, flush=True)


def _policy(af: Any) -> Any:
    # The watcher spins while anything is armed: the GPU gives it nothing to wake on.
    return dataclasses.replace(af.ProgressPolicy.latency(), trigger_spin_us=float("inf"))


def _expected(iters: int) -> tuple[Any, Any]:
    import numpy as np

    x = np.arange(L, dtype=np.int64) % P
    acc = np.zeros(L, np.int64)
    for _ in range(iters):
        s = (x + 1) % P
        r = (s * 3) % P
        x = (r * 2) % P
        acc = (acc * 31 + x) % P
    return x, acc


class Side:
    """One process's engine, buffers, flags and armed trigger/release for one phase."""

    def __init__(self, af: Any, torch: Any, eng: Any, nbytes: int) -> None:
        from asyncfabric import cuda_memops as cm

        self.af, self.torch, self.eng, self.cm = af, torch, eng, cm
        # cuda_ipc triggers GPU -> GPU writes (the firing stream copies, the watcher
        # posts the immediates); elsewhere the buffers are pinned host memory
        self.gpu = bool(eng.transport.gpu_triggers)
        if self.gpu:
            self.send = torch.zeros(nbytes // 8, dtype=torch.int64, device="cuda")
            self.recv = torch.zeros(nbytes // 8, dtype=torch.int64, device="cuda")
        else:
            self.send = torch.zeros(nbytes // 8, dtype=torch.int64).pin_memory()
            self.recv = torch.zeros(nbytes // 8, dtype=torch.int64).pin_memory()
        self.rsend = eng.register(self.send)
        self.rrecv = eng.register(self.recv)
        self.fire = cm.cuda_flag()
        self.ready = cm.cuda_flag()
        self.trig: Any = None
        self.rel: Any = None
        # cuda_ipc: a signal word in our GPU memory that the peer's stream stores into
        # (Engine.peer_word) and ours waits on, with no host on either side
        self.sig = torch.zeros(16, dtype=torch.int32, device="cuda") if self.gpu else None
        self.rsig = eng.register(self.sig) if self.gpu else None
        self.peer_sig: Any = None

    def sig_desc(self) -> bytes:
        return bytes(self.rsig.descriptor()) if self.rsig is not None else b""

    def signal_to(self, peer_sig_desc: bytes) -> None:
        self.peer_sig = self.eng.peer_word(self.af.Descriptor.from_bytes(peer_sig_desc))

    def desc(self) -> bytes:
        return bytes(self.rrecv.descriptor())

    def arm(self, peer_desc: bytes, imm: int) -> None:
        d = self.af.Descriptor.from_bytes(peer_desc)
        self.trig = self.eng.arm_write(self.rsend, d, self.fire, 1, imm=imm, reset=0, repeat=True)
        n = d.expected_imms(self.send.numel() * 8)
        self.rel = self.eng.counter(imm).release_word(n, self.ready, 1, repeat=True)

    def fire_on_stream(self) -> None:
        """Queue the trigger's fire on the current stream (with its copies, on cuda_ipc)."""
        self.cm.stream_fire(self.trig)

    def disarm(self) -> None:
        if self.trig is not None:
            self.trig.disarm()
        if self.rel is not None:
            self.rel.disarm()

    def unstick(self) -> None:
        """Let a stream stuck on ``ready`` go (after a failure), so the process can end."""
        for _ in range(2000):
            self.ready.set(1)
            if self.sig is not None:
                self.sig.fill_(1 << 30)  # (a stream stuck on the signal word)
            time.sleep(0.0005)


def _rank0_rounds(torch: Any, t: Side, n: int, minimal: bool, signal: bool) -> tuple[list, Any]:
    """Queue rank 0's ``n`` timed ping-pong rounds on the current stream: (compute),
    fire the trigger, then wait on the release word (``signal``: store into the
    peer's signal word and wait on ours), reset it, (compute). Returns the rounds'
    start/end events and the device value the compute carries."""
    cm = t.cm
    dev = torch.zeros(1, dtype=torch.int64, device="cuda")
    evs = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(n)
    ]
    word = t.sig if signal else t.ready
    for s_ev, e_ev in evs:
        s_ev.record()
        if not minimal:
            t.send.copy_(dev, non_blocking=True)
        t.fire_on_stream()
        if signal:
            cm.stream_fire(t.peer_sig, 1)
        cm.stream_wait(word, 1)
        cm.stream_fire(word, 0)
        if not minimal:
            dev.copy_(t.recv, non_blocking=True)
            dev.add_(1)
        e_ev.record()
    return evs, dev


async def _sync(torch: Any, side: Side, what: str) -> None:
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(None, torch.cuda.synchronize)
    try:
        await asyncio.wait_for(asyncio.shield(fut), TIMEOUT)
    except asyncio.TimeoutError:
        side.unstick()
        raise RuntimeError(
            f"{what}: the stream did not finish within {TIMEOUT} s (a lost trigger or release; "
            f"fire={side.fire.value} ready={side.ready.value}, trigger fires "
            f"{side.trig.fires if side.trig else '-'}, release stores "
            f"{side.rel.fired if side.rel else '-'})"
        ) from None


# ---------------------------------------------------------------- rank 1 (the child)


def _child(conn: Any, provider: str, iters: int, rounds: int, minimal: bool = False) -> None:
    import torch

    import asyncfabric as af
    from asyncfabric import cuda_memops as cm

    torch.cuda.set_device(0)

    async def main() -> None:
        async with af.Engine(provider, progress=_policy(af)) as eng:
            loop = asyncio.get_running_loop()
            g = Side(af, torch, eng, L * 8)
            t = Side(af, torch, eng, 8)
            conn.send((g.desc(), t.desc(), bytes(t.rrecv.descriptor()), t.sig_desc()))
            pg, pt, ph, psig = await loop.run_in_executor(None, conn.recv)
            while True:
                cmd, *a = await loop.run_in_executor(None, conn.recv)
                try:
                    if cmd == "exit":
                        conn.send(("ok", None))
                        return
                    if cmd == "graph":
                        g.arm(pg, IMM_G)
                        r = torch.zeros(L, dtype=torch.int64, device="cuda")
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            cm.stream_wait(g.ready, 1)
                            cm.stream_fire(g.ready, 0)
                            r.copy_(g.recv, non_blocking=True)
                            z = torch.remainder(r * 3, P)
                            g.send.copy_(z, non_blocking=True)
                            g.fire_on_stream()
                        conn.send(("ok", None))  # armed and captured: rank 0 may start
                        for _ in range(iters):
                            graph.replay()
                        await _sync(torch, g, "rank 1 graph")
                        await g.trig.wait(iters, timeout=TIMEOUT)
                        g.disarm()
                        conn.send(("ok", g.trig.fires))
                    elif cmd == "trig_lat":
                        t.arm(pt, IMM_T)
                        dev = torch.zeros(1, dtype=torch.int64, device="cuda")
                        conn.send(("ok", None))
                        for _ in range(rounds):
                            cm.stream_wait(t.ready, 1)
                            cm.stream_fire(t.ready, 0)
                            if not minimal:
                                dev.copy_(t.recv, non_blocking=True)
                                dev.add_(1)
                                t.send.copy_(dev, non_blocking=True)
                            t.fire_on_stream()
                        await _sync(torch, t, "rank 1 triggered latency")
                        t.disarm()
                        conn.send(("ok", None))
                    elif cmd == "sig_lat":
                        # the echo of rank 0's signal rounds: wait on our signal word,
                        # reset it, (compute), fire our trigger, store into rank 0's word
                        t.arm(pt, IMM_T)
                        t.signal_to(psig)
                        dev = torch.zeros(1, dtype=torch.int64, device="cuda")
                        conn.send(("ok", None))
                        for _ in range(rounds):
                            cm.stream_wait(t.sig, 1)
                            cm.stream_fire(t.sig, 0)
                            if not minimal:
                                dev.copy_(t.recv, non_blocking=True)
                                dev.add_(1)
                                t.send.copy_(dev, non_blocking=True)
                            t.fire_on_stream()
                            cm.stream_fire(t.peer_sig, 1)
                        await _sync(torch, t, "rank 1 signal latency")
                        t.disarm()
                        conn.send(("ok", None))
                    elif cmd == "raw_lat":
                        await _raw_echo(torch, conn, rounds, *a)
                    elif cmd == "host_lat":
                        dst = af.Descriptor.from_bytes(ph)
                        dev = torch.zeros(1, dtype=torch.int64, device="cuda")
                        c = eng.counter(IMM_H)
                        conn.send(("ok", None))
                        for _ in range(rounds):
                            await c.wait(1, timeout=TIMEOUT)
                            if not minimal:
                                dev.copy_(t.recv, non_blocking=True)
                                dev.add_(1)
                                t.send.copy_(dev, non_blocking=True)
                            if not t.gpu:  # cuda_ipc's write orders after the stream itself
                                torch.cuda.current_stream().synchronize()
                            await eng.write(t.rsend, dst, imm=IMM_H)
                        conn.send(("ok", None))
                except Exception as exc:
                    for s in (g, t):
                        s.unstick()
                    conn.send(("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))

    asyncio.run(main())


async def _raw_echo(torch: Any, conn: Any, rounds: int, peer: Any, shm_name: str) -> None:
    """Rank 1 of the raw torch floor: no asyncfabric. Wait for rank 0's flag, copy what
    landed back into rank 0's tensor (mapped by CUDA IPC), sync the stream, raise ours."""
    import numpy as np

    shm = shared_memory.SharedMemory(name=shm_name)
    try:
        flag = np.ndarray((2,), np.int64, shm.buf)
        land = torch.zeros(1, dtype=torch.int64, device="cuda")
        conn.send(("ok", land))  # rank 0 maps it
        stream = torch.cuda.current_stream()
        deadline = time.monotonic() + TIMEOUT
        for i in range(1, rounds + 1):
            while flag[0] < i:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"raw floor: rank 0's flag stayed at {flag[0]} < {i}")
            peer.copy_(land, non_blocking=True)
            stream.synchronize()
            flag[1] = i
        del flag
        conn.send(("ok", None))
    finally:
        shm.close()


async def _raw_floor(torch: Any, conn: Any, proc: Any, rounds: int, warmup: int) -> dict:
    """Rank 0 of the raw torch floor: copy 8 B into rank 1's tensor (CUDA IPC through
    torch.multiprocessing), sync the stream, raise a host flag in shared memory; rank 1
    echoes the same way. One way = RTT / 2. Checked: the last value came back."""
    import numpy as np

    shm = shared_memory.SharedMemory(create=True, size=64)
    try:
        flag = np.ndarray((2,), np.int64, shm.buf)
        flag[:] = 0
        land = torch.zeros(1, dtype=torch.int64, device="cuda")
        vals = torch.arange(rounds + 1, dtype=torch.int64, device="cuda")
        peer = await _ask(conn, proc, "raw_lat", land, shm.name)
        stream = torch.cuda.current_stream()
        rtts = []
        for i in range(1, rounds + 1):
            t0 = time.perf_counter()
            peer.copy_(vals[i : i + 1], non_blocking=True)
            stream.synchronize()
            flag[0] = i
            deadline = time.monotonic() + TIMEOUT
            while flag[1] < i:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"raw floor: rank 1's flag stayed at {flag[1]} < {i}")
            if i > warmup:
                rtts.append((time.perf_counter() - t0) * 1e6)
        await _ask_result(conn, proc, "raw_lat")
        ok = int(land.item()) == rounds
        del flag, peer
        return {"verified": ok, **_stats(rtts)}
    finally:
        shm.close()
        shm.unlink()


# ---------------------------------------------------------------- rank 0


async def _ask(conn: Any, proc: Any, cmd: str, *args: Any, timeout: float = 300) -> Any:
    conn.send((cmd, *args))
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    while not await loop.run_in_executor(None, conn.poll, 0.5):
        if not proc.is_alive():
            raise RuntimeError(f"rank 1 exited (code {proc.exitcode}) during {cmd!r}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"rank 1 did not answer {cmd!r} within {timeout} s")
    status, val = conn.recv()
    if status != "ok":
        raise RuntimeError(f"rank 1 failed {cmd!r}: {val}")
    return val


class _Phase:
    """One command to rank 1: a first answer (armed, ready) and a second (its end).
    After a failure here, ``abandon`` takes rank 1's second answer, whatever it is,
    so the next command's answers are not taken for this one's."""

    def __init__(self, conn: Any, proc: Any, cmd: str) -> None:
        self.conn, self.proc, self.cmd = conn, proc, cmd
        self.started = self.finished = False

    async def start(self) -> Any:
        val = await _ask(self.conn, self.proc, self.cmd)
        self.started = True
        return val

    async def finish(self) -> Any:
        val = await _ask_result(self.conn, self.proc, self.cmd)
        self.finished = True
        return val

    async def abandon(self) -> None:
        if self.started and not self.finished:
            try:
                await _ask_result(self.conn, self.proc, self.cmd, timeout=TIMEOUT + 120)
            except Exception:
                pass  # rank 1 reported its own failure, or is gone: the next _ask says so


def _stats(us: list[float]) -> dict[str, float]:
    s = sorted(us)
    return {
        "one_way_p50_us": round(statistics.median(s) / 2, 2),
        "one_way_p99_us": round(s[int(len(s) * 0.99) - 1] / 2, 2),
        "rtt_p50_us": round(statistics.median(s), 2),
        "rounds": len(s),
    }


async def amain(a: argparse.Namespace) -> int:
    import torch

    import asyncfabric as af
    from asyncfabric import cuda_memops as cm

    torch.cuda.set_device(0)
    ctx = mp.get_context("spawn")
    conn, cc = ctx.Pipe()
    proc = ctx.Process(
        target=_child, args=(cc, a.provider, a.iters, a.rounds, a.minimal), daemon=True
    )
    proc.start()
    failures = 0
    try:
        async with af.Engine(a.provider, progress=_policy(af)) as eng:
            loop = asyncio.get_running_loop()
            g = Side(af, torch, eng, L * 8)
            t = Side(af, torch, eng, 8)
            if not await loop.run_in_executor(None, conn.poll, 120):
                raise RuntimeError("rank 1 did not start within 120 s (see its error above)")
            cg, ct, ch, csig = conn.recv()
            conn.send((g.desc(), t.desc(), bytes(t.rrecv.descriptor()), t.sig_desc()))

            # 1. the captured graph, replayed
            ph = _Phase(conn, proc, "graph")
            try:
                await ph.start()  # rank 1 armed and captured
                g.arm(cg, IMM_G)
                x = torch.arange(L, dtype=torch.int64, device="cuda") % P
                acc = torch.zeros(L, dtype=torch.int64, device="cuda")
                r = torch.zeros(L, dtype=torch.int64, device="cuda")
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    s = torch.remainder(x + 1, P)
                    g.send.copy_(s, non_blocking=True)
                    g.fire_on_stream()
                    cm.stream_wait(g.ready, 1)
                    cm.stream_fire(g.ready, 0)
                    r.copy_(g.recv, non_blocking=True)
                    x.copy_(torch.remainder(r * 2, P))
                    acc.copy_(torch.remainder(acc * 31 + x, P))
                t0 = time.perf_counter()
                for _ in range(a.iters):
                    graph.replay()
                await _sync(torch, g, "rank 0 graph")
                took = time.perf_counter() - t0
                await g.trig.wait(a.iters, timeout=TIMEOUT)
                fires_1 = await ph.finish()
                g.disarm()
                want_x, want_acc = _expected(a.iters)
                ok = bool(
                    (x.cpu().numpy() == want_x).all() and (acc.cpu().numpy() == want_acc).all()
                )
                emit(
                    what="graph", iterations=a.iters, verified=ok, fires_rank0=g.trig.fires,
                    fires_rank1=fires_1, round_us=round(took / a.iters * 1e6, 2),
                    release_stores_rank0=g.rel.fired, bytes_per_round=L * 8,
                )  # fmt: skip
                failures += not ok
            except Exception as exc:
                failures += 1
                emit(what="graph", error=f"{type(exc).__name__}: {exc}")
                g.unstick()
                g.disarm()
                await ph.abandon()

            # 2a. 8 B ping-pong, GPU-triggered both ways
            ph = _Phase(conn, proc, "trig_lat")
            try:
                await ph.start()
                t.arm(ct, IMM_T)
                n = a.rounds
                evs, dev = _rank0_rounds(torch, t, n, a.minimal, signal=False)
                await _sync(torch, t, "rank 0 triggered latency")
                await ph.finish()
                if a.minimal:
                    await t.trig.wait(n, timeout=TIMEOUT)
                t.disarm()
                # (minimal: no compute, so the data is not checked; the fires are)
                ok = int(dev.item()) == 2 * n if not a.minimal else t.trig.fires == n
                rtts = [s_ev.elapsed_time(e_ev) * 1e3 for s_ev, e_ev in evs[a.warmup :]]
                path = "gpu_triggered_minimal" if a.minimal else "gpu_triggered"
                emit(what="latency", path=path, bytes=8, verified=ok, **_stats(rtts))
                failures += not ok
            except Exception as exc:
                failures += 1
                emit(what="latency", path="gpu_triggered", error=f"{type(exc).__name__}: {exc}")
                t.disarm()
                t.unstick()
                await ph.abandon()

            # 2s. 8 B ping-pong, GPU-triggered both ways, released by signal words in GPU
            # memory (cuda_ipc: Engine.peer_word), no host on the path
            if t.gpu:
                ph = _Phase(conn, proc, "sig_lat")
                try:
                    await ph.start()
                    t.arm(ct, IMM_T)
                    t.signal_to(csig)
                    n = a.rounds
                    evs, dev = _rank0_rounds(torch, t, n, a.minimal, signal=True)
                    await _sync(torch, t, "rank 0 signal latency")
                    await ph.finish()
                    await t.trig.wait(n, timeout=TIMEOUT)  # the immediates all went too
                    t.disarm()
                    ok = int(dev.item()) == 2 * n if not a.minimal else t.trig.fires == n
                    rtts = [s_ev.elapsed_time(e_ev) * 1e3 for s_ev, e_ev in evs[a.warmup :]]
                    path = "gpu_signal_minimal" if a.minimal else "gpu_signal"
                    emit(what="latency", path=path, bytes=8, verified=ok, **_stats(rtts))
                    failures += not ok
                except Exception as exc:
                    failures += 1
                    emit(what="latency", path="gpu_signal", error=f"{type(exc).__name__}: {exc}")
                    t.disarm()
                    t.unstick()
                    await ph.abandon()

            # 2c. the raw torch floor: CUDA IPC copy + stream sync + host flag, no asyncfabric
            try:
                row = await _raw_floor(torch, conn, proc, a.rounds, a.warmup)
                emit(what="latency", path="raw_torch_floor", bytes=8, **row)
                failures += not row["verified"]
            except Exception as exc:
                failures += 1
                emit(what="latency", path="raw_torch_floor", error=f"{type(exc).__name__}: {exc}")

            # 2b. 8 B ping-pong, host sync + await write + await counter, both sides
            ph = _Phase(conn, proc, "host_lat")
            try:
                await ph.start()
                dst = af.Descriptor.from_bytes(ch)
                c = eng.counter(IMM_H)
                dev = torch.zeros(1, dtype=torch.int64, device="cuda")
                rtts = []
                for i in range(a.rounds):
                    t0 = time.perf_counter()
                    if not a.minimal:
                        t.send.copy_(dev, non_blocking=True)
                    if not t.gpu:
                        torch.cuda.current_stream().synchronize()
                    await eng.write(t.rsend, dst, imm=IMM_H)
                    await c.wait(1, timeout=TIMEOUT)
                    if not a.minimal:
                        dev.copy_(t.recv, non_blocking=True)
                        dev.add_(1)
                    if not t.gpu:
                        torch.cuda.current_stream().synchronize()
                    if i >= a.warmup:
                        rtts.append((time.perf_counter() - t0) * 1e6)
                await ph.finish()
                # (minimal: no compute, as the raw floor has none; the counts are checked)
                ok = int(dev.item()) == 2 * a.rounds if not a.minimal else True
                path = "host_sync_await_minimal" if a.minimal else "host_sync_await"
                emit(what="latency", path=path, bytes=8, verified=ok, **_stats(rtts))
                failures += not ok
            except Exception as exc:
                failures += 1
                emit(what="latency", path="host_sync_await", error=f"{type(exc).__name__}: {exc}")
                await ph.abandon()
            await _ask(conn, proc, "exit")
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return 1 if failures else 0


async def _ask_result(conn: Any, proc: Any, what: str, timeout: float = 300) -> Any:
    """The second answer of a two-step command (rank 1 reports its end)."""
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    while not await loop.run_in_executor(None, conn.poll, 0.5):
        if not proc.is_alive():
            raise RuntimeError(f"rank 1 exited (code {proc.exitcode}) during {what!r}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"rank 1 did not finish {what!r} within {timeout} s")
    status, val = conn.recv()
    if status != "ok":
        raise RuntimeError(f"rank 1 failed {what!r}: {val}")
    return val


def save(out: str | None, name: str) -> None:
    """The rows emitted so far into ``out/name`` (no ``out``: nothing)."""
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / name).write_text("\n".join(_lines) + "\n")


def cuda_here(script: str) -> Any:
    """torch, or None after printing why this script skips (no torch, no CUDA device)."""
    try:
        import torch
    except ImportError:
        print(json.dumps({"skipped": f"{script}: torch is not installed"}))
        return None
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": f"{script}: torch sees no CUDA device here"}))
        return None
    return torch


def _mps_running() -> bool:
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe, "control"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="directory for gpu_triggers.jsonl")
    p.add_argument("--provider", default="shm")
    p.add_argument("--iters", type=int, default=1000, help="graph replays")
    p.add_argument("--rounds", type=int, default=2000, help="latency rounds per path")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument(
        "--minimal", action="store_true",
        help="latency rounds without compute: fire, wait, reset (the trigger path alone)",
    )  # fmt: skip
    a = p.parse_args()
    torch = cuda_here("gpu_triggers")
    if torch is None:
        return 0
    import asyncfabric as af

    emit(
        what="meta", gpu=torch.cuda.get_device_name(0), torch=torch.__version__,
        cuda=torch.version.cuda, mps=_mps_running(), provider=a.provider, iters=a.iters,
        rounds=a.rounds, asyncfabric=af.__version__, argv=sys.argv,
        env={k: v for k, v in os.environ.items() if k.startswith("ASYNCFABRIC_")},
    )  # fmt: skip
    if not _mps_running():
        emit(
            warning="CUDA MPS does not seem to run (no control pipe): two processes on one GPU "
            "then time-slice; start it with nvidia-cuda-mps-control -d"
        )
    try:
        rc = asyncio.run(amain(a))
    except Exception as exc:
        emit(what="error", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        rc = 1
    save(a.out, "gpu_triggers.jsonl")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
