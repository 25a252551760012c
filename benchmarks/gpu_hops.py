"""Where a GPU-triggered hop's time goes (issue 18): the stream signals alone, no fabric.

Run on the GPU machine under CUDA MPS (``nvidia-cuda-mps-control -d``), next to
``gpu_triggers.py`` in the same call. Each row is 8 B or a 32-bit word, 2,000 rounds:

1. ``memop_host_rtt`` (one process): the host stores a pinned, GPU-mapped word; a
   stream waiting on it (``cuStreamWaitValue32``) writes a second word
   (``cuStreamWriteValue32``) that the host spins on. Host -> GPU -> host, as a
   release word and a trigger see it.
2. ``gpu_only_pingpong`` (two processes): each stream copies 8 B into the peer's
   tensor (CUDA IPC, torch.multiprocessing) and writes the peer's word in the peer's
   GPU memory; the peer's stream waits on that word. No host in the loop at all: the
   floor of any stream-to-stream signal between two processes on one GPU.

3. ``gpu_only_signal``: 2 without the copy (the word stores and waits alone);
   ``gpu_only_kernel``: 2 with cuda_ipc's copy kernel, which copies and then stores
   the peer's word in one launch, in place of a copy-engine copy and a store.
4. ``copy_sync_torch`` / ``copy_sync_driver`` / ``copy_sync_kernel`` (one process):
   an 8 B device-to-device copy and a stream sync, through torch (as the raw
   floor's sender), through the copy-engine driver calls cuda_ipc made before, and
   through its copy kernel: the sender's cost, alone. ``copy_word_kernel``: the
   kernel stores a pinned, GPU-mapped word after the copy, which the host spins on
   in place of the stream sync.

For 2 and 3, one way = RTT / 2, from CUDA events around each round on rank 0's stream.
Prints JSON lines (``--out DIR`` also writes DIR/gpu_hops.jsonl).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
import traceback
from typing import Any

from gpu_triggers import _stats, cuda_here, emit, save  # (this folder: run as a script)

TIMEOUT = 60.0


def _wait_value(stream: int, ptr: int, value: int) -> None:
    from asyncfabric.backends.staged import _cuda

    _cuda.wait_value32(stream, ptr, value)


def _write_value(stream: int, ptr: int, value: int) -> None:
    from asyncfabric.backends.staged import _cuda

    _cuda.write_value32(stream, ptr, value)


def memop_host_rtt(rounds: int, warmup: int) -> dict[str, Any]:
    import ctypes

    import torch

    from asyncfabric import cuda_memops as cm

    f_in, f_out = cm.cuda_flag(), cm.cuda_flag()
    s = torch.cuda.Stream()
    h = int(s.cuda_stream)
    word = ctypes.c_uint32.from_address(f_out.ptr)
    rtts = []
    for i in range(1, rounds + 1):
        _wait_value(h, f_in.device_ptr, i)
        _write_value(h, f_out.device_ptr, i)
        time.sleep(0)  # the launch is queued; the GPU waits on f_in
        t0 = time.perf_counter()
        f_in.set(i)
        deadline = t0 + TIMEOUT
        while word.value < i:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"round {i}: the stream never wrote the word back")
        if i > warmup:
            rtts.append((time.perf_counter() - t0) * 1e6)
    s.synchronize()
    return _stats(rtts)  # (its rtt_p50_us: host -> GPU -> host)


def _copy_kernel() -> Any:
    from asyncfabric.backends.cuda_ipc import _kernel

    return _kernel.kernel(0)


def _peer(conn: Any, rounds: int, copy: str = "torch") -> None:
    import torch
    import torch.multiprocessing  # noqa: F401  (CUDA tensors over the pipe: IPC)

    torch.cuda.set_device(0)
    try:
        word = torch.zeros(16, dtype=torch.int32, device="cuda")
        land = torch.zeros(1, dtype=torch.int64, device="cuda")
        conn.send((word, land))
        peer_word, peer_land = conn.recv()
        s = torch.cuda.current_stream()
        h = int(s.cuda_stream)
        k = _copy_kernel() if copy == "kernel" else None
        for i in range(1, rounds + 1):
            _wait_value(h, word.data_ptr(), i)
            if k is not None:
                k.launch(h, peer_land.data_ptr(), land.data_ptr(), 8, peer_word.data_ptr(), i)
                continue
            if copy:
                peer_land.copy_(land, non_blocking=True)
            _write_value(h, peer_word.data_ptr(), i)
        s.synchronize()
        conn.send(("ok", None))
        conn.recv()  # keep our tensors alive until rank 0 is done with them
    except Exception as exc:
        conn.send(("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def gpu_only_pingpong(rounds: int, warmup: int, copy: str = "torch") -> dict[str, Any]:
    import torch
    import torch.multiprocessing  # noqa: F401

    ctx = mp.get_context("spawn")
    conn, cc = ctx.Pipe()
    proc = ctx.Process(target=_peer, args=(cc, rounds, copy), daemon=True)
    proc.start()
    try:
        if not conn.poll(120):
            raise RuntimeError("the peer did not start")
        peer_word, peer_land = conn.recv()
        word = torch.zeros(16, dtype=torch.int32, device="cuda")
        land = torch.zeros(1, dtype=torch.int64, device="cuda")
        conn.send((word, land))
        vals = torch.arange(rounds + 1, dtype=torch.int64, device="cuda")
        s = torch.cuda.current_stream()
        h = int(s.cuda_stream)
        k = _copy_kernel() if copy == "kernel" else None
        evs = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(rounds)
        ]
        for i, (a, b) in enumerate(evs, 1):
            a.record(s)
            if k is not None:
                src = vals[i : i + 1].data_ptr()
                k.launch(h, peer_land.data_ptr(), src, 8, peer_word.data_ptr(), i)
            else:
                if copy:
                    peer_land.copy_(vals[i : i + 1], non_blocking=True)
                _write_value(h, peer_word.data_ptr(), i)
            _wait_value(h, word.data_ptr(), i)
            b.record(s)
        end = torch.cuda.Event()
        end.record(s)
        t0 = time.monotonic()
        while not end.query():
            if time.monotonic() - t0 > TIMEOUT:
                raise RuntimeError("the ping-pong did not finish (a lost word?)")
            time.sleep(0.001)
        if not conn.poll(TIMEOUT):
            raise RuntimeError("the peer did not report")
        status, val = conn.recv()
        if status != "ok":
            raise RuntimeError(f"the peer failed: {val}")
        ok = int(land.item()) == rounds if copy else True
        rtts = [a.elapsed_time(b) * 1e3 for a, b in evs[warmup:]]
        conn.send("bye")
        return {"verified": ok, **_stats(rtts)}
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def gpu_only_signal(rounds: int, warmup: int) -> dict[str, Any]:
    """The ping-pong above without the copy: the peers' word stores and waits alone."""
    return gpu_only_pingpong(rounds, warmup, copy="")


def gpu_only_kernel(rounds: int, warmup: int) -> dict[str, Any]:
    """The ping-pong with the copy kernel: copy, fence and the peer's word, one launch."""
    return gpu_only_pingpong(rounds, warmup, copy="kernel")


def _copy_sync(rounds: int, warmup: int, how: str) -> dict[str, Any]:
    import ctypes

    import torch

    from asyncfabric.backends.staged import _cuda

    src = torch.arange(8, dtype=torch.uint8, device="cuda")
    dst = torch.zeros(8, dtype=torch.uint8, device="cuda")
    s = torch.cuda.current_stream()
    h = int(s.cuda_stream)
    k = _copy_kernel() if how.startswith("kernel") else None
    host, dev = _cuda.host_words(64)
    word = ctypes.c_uint32.from_address(host)
    us = []
    for i in range(1, rounds + 1):
        t0 = time.perf_counter()
        if how == "driver":
            _cuda.copy_async(dst.data_ptr(), src.data_ptr(), 8, h)
            _cuda.stream_sync(h)
        elif how == "kernel":
            k.launch(h, dst.data_ptr(), src.data_ptr(), 8)
            _cuda.stream_sync(h)
        elif how == "kernel_word":
            k.launch(h, dst.data_ptr(), src.data_ptr(), 8, dev, i)
            deadline = t0 + TIMEOUT
            while word.value != i:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"round {i}: the kernel never stored the word")
        else:
            dst.copy_(src, non_blocking=True)
            s.synchronize()
        if i > warmup:
            us.append((time.perf_counter() - t0) * 1e6)
    s.synchronize()
    ok = bool(torch.equal(dst, src))
    st = _stats(us)  # (its rtt_* are the times themselves: nothing is halved here)
    return {
        "verified": ok,
        "p50_us": st["rtt_p50_us"],
        "p99_us": round(2 * st["one_way_p99_us"], 2),
    }


def copy_sync_torch(rounds: int, warmup: int) -> dict[str, Any]:
    """8 B device-to-device copy + stream sync, through torch (the raw floor's sender)."""
    return _copy_sync(rounds, warmup, "torch")


def copy_sync_driver(rounds: int, warmup: int) -> dict[str, Any]:
    """The same through copy-engine driver calls (ctypes), as cuda_ipc made them before."""
    return _copy_sync(rounds, warmup, "driver")


def copy_sync_kernel(rounds: int, warmup: int) -> dict[str, Any]:
    """The same through cuda_ipc's copy kernel, then the stream sync."""
    return _copy_sync(rounds, warmup, "kernel")


def copy_word_kernel(rounds: int, warmup: int) -> dict[str, Any]:
    """The copy kernel storing a mapped word after the copy; the host spins on it."""
    return _copy_sync(rounds, warmup, "kernel_word")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    a = p.parse_args()
    torch = cuda_here("gpu_hops")
    if torch is None:
        return 0
    torch.cuda.set_device(0)
    emit(what="meta", gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    rc = 0
    rows = (
        ("memop_host_rtt", memop_host_rtt),
        ("gpu_only_pingpong", gpu_only_pingpong),
        ("gpu_only_signal", gpu_only_signal),
        ("gpu_only_kernel", gpu_only_kernel),
        ("copy_sync_torch", copy_sync_torch),
        ("copy_sync_driver", copy_sync_driver),
        ("copy_sync_kernel", copy_sync_kernel),
        ("copy_word_kernel", copy_word_kernel),
    )
    for name, fn in rows:
        try:
            emit(what=name, **fn(a.rounds, a.warmup))
        except Exception as exc:
            rc = 1
            emit(what=name, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
    save(a.out, "gpu_hops.jsonl")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
