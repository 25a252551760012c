"""Peer libraries measured next to asyncfabric: same sizes, same two processes.

Each peer is optional. :func:`availability` says which can run here and, for
each one that cannot, why (shown in the result table and the JSON
``skipped`` list). The roles follow the same protocol as the asyncfabric ones:
a stream ends with a one-byte acknowledgement from the receiver, and the
sender's clock covers it.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import tempfile
import time
from typing import Any

import numpy as np

PEER_IMPLS = ("ucxx", "nixl", "gloo", "zmq")
_MODULES = {"ucxx": "ucxx", "nixl": "nixl", "gloo": "torch.distributed", "zmq": "zmq.asyncio"}
_INSTALL = {
    "ucxx": "pip install ucxx-cu12",
    "nixl": "pip install nixl",
    "gloo": "pip install 'asyncfabric[torch]'",
    "zmq": "pip install 'asyncfabric[peers]' (pyzmq)",
}
# Peers that can import but have no roles here, with the reason.
_NOT_WIRED = {
    "nixl": "NIXL's UCX backend needs a NIXL agent per process and metadata exchange; "
    "not wired into this runner yet",
}


def availability(impls: tuple[str, ...] = PEER_IMPLS) -> tuple[list[str], dict[str, str]]:
    """(peers that can run, {peer: why not}) for the requested peers."""
    ok, why = [], {}
    for name in impls:
        try:
            importlib.import_module(_MODULES[name])
        except Exception as exc:  # ImportError, or a broken native dependency
            why[name] = f"{name} skipped: cannot import {_MODULES[name]} ({exc}); {_INSTALL[name]}"
            continue
        if name == "gloo":
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_gloo_available():
                why[name] = "gloo skipped: this torch build has no gloo backend"
                continue
        if name in _NOT_WIRED:
            why[name] = f"{name} skipped: {_NOT_WIRED[name]}"
            continue
        ok.append(name)
    return ok, why


class PeerState:
    def __init__(self) -> None:
        self.zctx: Any = None
        self.zsock: Any = None
        self.gloo = False
        self.ucx_ep: Any = None
        self.ucx_listener: Any = None
        self.ucx_ready: Any = None
        self.ucx_done: Any = None

    async def close(self) -> None:
        if self.zsock is not None:
            self.zsock.close(linger=0)
            self.zctx.term()
            self.zsock = self.zctx = None
        if self.gloo:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.gloo = False
        if self.ucx_done is not None and not self.ucx_done.done():
            self.ucx_done.set_result(None)
        if self.ucx_ep is not None:
            try:
                await self.ucx_ep.close()
            except Exception:
                pass
            self.ucx_ep = None
        if self.ucx_listener is not None:
            self.ucx_listener.close()
            self.ucx_listener = None


def _buf(size: int) -> np.ndarray:
    return np.ones(max(size, 1), np.uint8)[:size] if size else np.ones(1, np.uint8)[:0]


# ---------------------------------------------------------------- zmq (pyzmq asyncio, PAIR over ipc)


def zmq_endpoint() -> str:
    return f"ipc://{tempfile.gettempdir()}/afbench-{os.getpid()}-{time.monotonic_ns()}.ipc"


async def zmq_open(st: PeerState, bind: bool, endpoint: str) -> None:
    import zmq
    import zmq.asyncio

    await PeerState.close(st)
    st.zctx = zmq.asyncio.Context()
    st.zsock = st.zctx.socket(zmq.PAIR)
    st.zsock.setsockopt(zmq.SNDHWM, 1000)
    st.zsock.setsockopt(zmq.RCVHWM, 1000)
    if bind:
        st.zsock.bind(endpoint)
    else:
        st.zsock.connect(endpoint)
    # one round trip so the connection is up before timing
    if bind:
        await st.zsock.send(b"hello")
        await st.zsock.recv()
    else:
        await st.zsock.recv()
        await st.zsock.send(b"hello")


async def zmq_stream_send(
    st: PeerState, size: int, iters: int, reps: int, warmup: int = 1
) -> list[int]:
    sock, data = st.zsock, _buf(size).tobytes()
    copy = size < 64 * 1024  # zero-copy pays only for large frames
    out = []
    for r in range(warmup + reps):
        t0 = time.perf_counter_ns()
        for _ in range(iters):
            await sock.send(data, copy=copy)
        await sock.recv()
        dt = time.perf_counter_ns() - t0
        if r >= warmup:
            out.append(dt)
    return out


async def zmq_stream_recv(st: PeerState, size: int, iters: int, reps: int, warmup: int = 1) -> None:
    sock = st.zsock
    copy = size < 64 * 1024
    for _ in range(warmup + reps):
        for _ in range(iters):
            await sock.recv(copy=copy)
        await sock.send(b"a")


async def zmq_pingpong(
    st: PeerState, initiator: bool, size: int, iters: int, reps: int = 1, warmup: int = 1
) -> list[int]:
    sock, data = st.zsock, _buf(size).tobytes()
    n = iters * (reps + warmup)
    rtts = [0] * n
    clock = time.perf_counter_ns
    if initiator:
        for i in range(n):
            t0 = clock()
            await sock.send(data)
            await sock.recv()
            rtts[i] = clock() - t0
        return rtts[iters * warmup :]
    for _ in range(n):
        await sock.recv()
        await sock.send(data)
    return []


# ---------------------------------------------------------------- gloo (torch.distributed isend/irecv over loopback tcp)


async def gloo_open(st: PeerState, rank: int, port: int) -> None:
    import torch.distributed as dist

    if st.gloo:
        return
    await asyncio.to_thread(
        dist.init_process_group,
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
    )
    st.gloo = True


def _tensor(size: int) -> Any:
    import torch

    return torch.ones(max(size, 1), dtype=torch.uint8)[: size or 1]


async def gloo_stream_send(
    st: PeerState, size: int, iters: int, reps: int, warmup: int = 1
) -> list[int]:
    import torch.distributed as dist

    t, ack = _tensor(size), _tensor(1)
    out = []
    for r in range(warmup + reps):
        t0 = time.perf_counter_ns()
        reqs = [dist.isend(t, 1) for _ in range(iters)]
        for q in reqs:
            q.wait()
        dist.recv(ack, 1)
        dt = time.perf_counter_ns() - t0
        if r >= warmup:
            out.append(dt)
    return out


async def gloo_stream_recv(
    st: PeerState, size: int, iters: int, reps: int, warmup: int = 1
) -> None:
    import torch.distributed as dist

    t, ack = _tensor(size), _tensor(1)
    for _ in range(warmup + reps):
        reqs = [dist.irecv(t, 0) for _ in range(iters)]
        for q in reqs:
            q.wait()
        dist.send(ack, 0)


async def gloo_pingpong(
    st: PeerState, initiator: bool, size: int, iters: int, reps: int = 1, warmup: int = 1
) -> list[int]:
    import torch.distributed as dist

    t = _tensor(size)
    other = 1 if initiator else 0
    n = iters * (reps + warmup)
    rtts = [0] * n
    clock = time.perf_counter_ns
    for i in range(n):
        if initiator:
            t0 = clock()
            dist.isend(t, other).wait()
            dist.irecv(t, other).wait()
            rtts[i] = clock() - t0
        else:
            dist.irecv(t, other).wait()
            dist.isend(t, other).wait()
    return rtts[iters * warmup :] if initiator else []


# ---------------------------------------------------------------- UCXX (asyncio API; UCX picks the transports)


async def ucxx_listen(st: PeerState, port: int) -> None:
    import ucxx

    loop = asyncio.get_running_loop()
    st.ucx_ready = loop.create_future()
    st.ucx_done = loop.create_future()

    async def handler(ep: Any) -> None:
        st.ucx_ep = ep
        if not st.ucx_ready.done():
            st.ucx_ready.set_result(None)
        await st.ucx_done  # keep the handler (and so the endpoint) alive

    st.ucx_listener = ucxx.create_listener(handler, port)


async def ucxx_accept(st: PeerState) -> None:
    await asyncio.wait_for(st.ucx_ready, 60)
    buf = np.empty(1, np.uint8)
    await st.ucx_ep.recv(buf)
    await st.ucx_ep.send(buf)


async def ucxx_connect(st: PeerState, host: str, port: int) -> None:
    import ucxx

    st.ucx_ep = await ucxx.create_endpoint(host, port)
    buf = np.ones(1, np.uint8)
    await st.ucx_ep.send(buf)
    await st.ucx_ep.recv(buf)


async def ucxx_stream_send(
    st: PeerState, size: int, iters: int, reps: int, warmup: int = 1
) -> list[int]:
    ep, data, ack = st.ucx_ep, _buf(size), np.empty(1, np.uint8)
    out = []
    for r in range(warmup + reps):
        t0 = time.perf_counter_ns()
        for _ in range(iters):
            await ep.send(data)
        await ep.recv(ack)
        dt = time.perf_counter_ns() - t0
        if r >= warmup:
            out.append(dt)
    return out


async def ucxx_stream_recv(
    st: PeerState, size: int, iters: int, reps: int, warmup: int = 1
) -> None:
    ep, data, ack = st.ucx_ep, np.empty(max(size, 1), np.uint8)[:size], np.ones(1, np.uint8)
    for _ in range(warmup + reps):
        for _ in range(iters):
            await ep.recv(data)
        await ep.send(ack)


async def ucxx_pingpong(
    st: PeerState, initiator: bool, size: int, iters: int, reps: int = 1, warmup: int = 1
) -> list[int]:
    ep, data = st.ucx_ep, _buf(size).copy()
    n = iters * (reps + warmup)
    rtts = [0] * n
    clock = time.perf_counter_ns
    for i in range(n):
        if initiator:
            t0 = clock()
            await ep.send(data)
            await ep.recv(data)
            rtts[i] = clock() - t0
        else:
            await ep.recv(data)
            await ep.send(data)
    return rtts[iters * warmup :] if initiator else []
