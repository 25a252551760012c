"""Peer libraries measured next to asyncfabric: same sizes, same two processes.

Each peer is optional. :func:`availability` says which can run here and, for
each one that cannot, why (shown in the result table and the JSON
``skipped`` list). The roles follow the same protocol as the asyncfabric ones:
a stream ends with a one-byte acknowledgement from the receiver, and the
sender's clock covers it (NIXL and Mooncake: an end-of-stream notification
and one back). NIXL and Mooncake run in worker processes of their own
(:data:`OWN_WORKERS`, see the runner).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import tempfile
import time
from typing import Any

import numpy as np

PEER_IMPLS = ("ucxx", "nixl", "nixl64", "mooncake", "gloo", "zmq")
_MODULES = {"ucxx": "ucxx", "nixl": "nixl", "nixl64": "nixl", "mooncake": "mooncake.engine",
            "gloo": "torch.distributed", "zmq": "zmq.asyncio"}  # fmt: skip
_INSTALL = {
    "ucxx": "pip install ucxx-cu12 (in 'asyncfabric[peers]')",
    "nixl": "pip install nixl (in 'asyncfabric[peers]')",
    "nixl64": "pip install nixl (in 'asyncfabric[peers]')",
    "mooncake": "pip install mooncake-transfer-engine-non-cuda (in 'asyncfabric[peers]')",
    "gloo": "pip install 'asyncfabric[torch]'",
    "zmq": "pip install 'asyncfabric[peers]' (pyzmq)",
}
# Peers that can import but have no roles here, with the reason.
_NOT_WIRED: dict[str, str] = {}
# Peers whose libraries crash when their process exits (NIXL segfaults at interpreter exit):
# the runner gives each its own pair of worker processes and ignores how those exit.
OWN_WORKERS = ("nixl", "nixl64", "mooncake")


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
        # NIXL (nx_*) and Mooncake (mc_*): the agent or engine, its registered buffer, the
        # peer's name or session and its buffer's address, notifications not yet consumed.
        self.nx: Any = None
        self.nx_buf: Any = None
        self.nx_peer = ""
        self.nx_raddr = 0
        self.nx_pending = 0
        self.mc: Any = None
        self.mc_buf: Any = None
        self.mc_peer = ""
        self.mc_raddr = 0
        self.mc_pending = 0
        # set by NIXL and Mooncake: the worker leaves with os._exit after its last reply
        # (their libraries crash in the interpreter's teardown), closing nothing of theirs
        self.hard_exit = False

    async def close(self) -> None:
        if self.zsock is not None:
            self.zsock.close(linger=0)
            self.zctx.term()
            self.zsock = self.zctx = None
        if self.gloo:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.gloo = False
        await self.close_ucx()

    async def close_ucx(self) -> None:
        if self.ucx_done is not None and not self.ucx_done.done():
            self.ucx_done.set_result(None)
        if self.ucx_ep is not None:
            try:
                await self.ucx_ep.close()
            except Exception:
                pass
            self.ucx_ep = None
        if self.ucx_listener is not None:
            # let the handler (released by ucx_done) retire first, else ucxx warns at GC
            for _ in range(1000):
                if not getattr(self.ucx_listener, "active_clients", 0):
                    break
                await asyncio.sleep(0.001)
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

    await st.close_ucx()  # the previous suite's endpoint and listener
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

    await st.close_ucx()
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


# ---------------------------------------------------------------- NIXL (nixl._api, UCX backend, DRAM)
#
# One agent per worker process; each registers one host buffer and the runner hands each
# side the other's agent metadata (get_agent_metadata -> add_remote_agent) and buffer
# address. A stream posts WRITE transfers made once from prepared descriptor lists
# (prep_xfer_dlist + make_prepped_xfer), reposted as they complete (check_xfer_state),
# ``window`` of them in flight; each carries ``batch`` descriptors of ``size`` bytes (1 for
# "nixl", 64 for "nixl64"). When every transfer is DONE the sender sends a notification
# (send_notif); the receiver, polling get_new_notifs, answers with one, and the sender's
# clock stops on it. Pingpong: a WRITE whose transfer carries a notification, each way.

NIXL_WINDOW = 64  # transfers in flight ("nixl": one write each, the asyncfabric lanes)
NIXL_BATCH, NIXL_BATCH_WINDOW = 64, 2  # "nixl64": 64 descriptors a transfer, 2 in flight
PEER_TIMEOUT_S = 60.0


async def nixl_open(st: PeerState, agent: str, nbytes: int) -> dict[str, Any]:
    """Create this process's agent (UCX backend), register a buffer; return what the peer needs."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # its INFO lines go to stdout
    from nixl._api import nixl_agent, nixl_agent_config

    st.hard_exit = True
    # No progress thread: the roles poll (check_xfer_state, get_new_notifs), which
    # progresses UCX; a thread per agent would compete for the two cores.
    st.nx = nixl_agent(agent, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    if "UCX" not in st.nx.backends:
        raise RuntimeError(f"NIXL has no UCX backend here (plugins: {st.nx.get_plugin_list()})")
    st.nx_buf = np.ones(max(nbytes, 64), np.uint8)  # touch every page before timing
    st.nx.register_memory([(st.nx_buf.ctypes.data, st.nx_buf.nbytes, 0, "")], "DRAM")
    return {"meta": st.nx.get_agent_metadata(), "addr": int(st.nx_buf.ctypes.data)}


async def nixl_connect(st: PeerState, peer: dict[str, Any]) -> None:
    name = st.nx.add_remote_agent(peer["meta"])
    st.nx_peer = name.decode() if isinstance(name, bytes) else str(name)
    st.nx_raddr = int(peer["addr"])
    st.nx.make_connection(st.nx_peer)


def _nx_wait(st: PeerState, count: int = 1) -> None:
    """Spin on get_new_notifs until ``count`` notifications from the peer are in; consume them."""
    deadline = time.monotonic() + PEER_TIMEOUT_S
    get = st.nx.get_new_notifs
    while st.nx_pending < count:
        for msgs in get().values():
            st.nx_pending += len(msgs)
        if st.nx_pending < count and time.monotonic() > deadline:
            raise TimeoutError(f"no NIXL notification from {st.nx_peer} in {PEER_TIMEOUT_S} s")
    st.nx_pending -= count


def _nx_done(ag: Any, h: Any) -> None:
    """Spin on check_xfer_state until the transfer is DONE."""
    state = ag.check_xfer_state(h)
    if state == "PROC":
        deadline = time.monotonic() + PEER_TIMEOUT_S
        while state == "PROC":
            state = ag.check_xfer_state(h)
            if state == "PROC" and time.monotonic() > deadline:
                raise TimeoutError(f"NIXL transfer not done in {PEER_TIMEOUT_S} s")
    if state != "DONE":
        raise RuntimeError(f"NIXL transfer failed ({state})")


def _nx_post(ag: Any, h: Any) -> bool:
    """Post a transfer; True when it finished inside the call."""
    state = ag.transfer(h)
    if state == "ERR":
        raise RuntimeError("NIXL could not post a transfer")
    return state == "DONE"


def _nx_lists(st: PeerState, size: int, n: int) -> tuple[Any, Any]:
    """Prepared descriptor lists of ``n`` entries of ``size`` bytes: local, and the peer's."""
    ag, sz = st.nx, max(size, 1)
    loc = ag.prep_xfer_dlist("NIXL_INIT_AGENT", [(st.nx_buf.ctypes.data, sz, 0)] * n, "DRAM")
    rem = ag.prep_xfer_dlist(st.nx_peer, [(st.nx_raddr, sz, 0)] * n, "DRAM")
    return loc, rem


async def nixl_stream_send(
    st: PeerState, size: int, iters: int, reps: int, warmup: int = 1, batch: int = 1,
    window: int = NIXL_WINDOW,
) -> list[int]:  # fmt: skip
    ag = st.nx
    nb = max(1, min(batch, iters))
    nfull, tail = divmod(iters, nb)
    w = max(1, min(window, nfull))
    loc, rem = _nx_lists(st, size, nb)
    idx = list(range(nb))
    hs = [ag.make_prepped_xfer("WRITE", loc, idx, rem, idx) for _ in range(w)]
    th = ag.make_prepped_xfer("WRITE", loc, idx[:tail], rem, idx[:tail]) if tail else None
    out = []
    try:
        for r in range(warmup + reps):
            t0 = time.perf_counter_ns()
            done = [True] * w
            for j in range(nfull):
                k = j % w
                if not done[k]:
                    _nx_done(ag, hs[k])
                done[k] = _nx_post(ag, hs[k])
            if th is not None and not _nx_post(ag, th):
                _nx_done(ag, th)
            for k in range(w):
                if not done[k]:
                    _nx_done(ag, hs[k])
            ag.send_notif(st.nx_peer, b"end")
            _nx_wait(st)  # the receiver's acknowledgement
            dt = time.perf_counter_ns() - t0
            if r >= warmup:
                out.append(dt)
    finally:
        for h in hs + ([th] if th is not None else []):
            h.release()
        loc.release()
        rem.release()
    return out


async def nixl_stream_recv(
    st: PeerState, size: int, iters: int, reps: int, warmup: int = 1
) -> None:
    for _ in range(warmup + reps):
        _nx_wait(st)  # the sender's end-of-stream notification
        st.nx.send_notif(st.nx_peer, b"ack")


async def nixl64_stream_send(
    st: PeerState, size: int, iters: int, reps: int, warmup: int = 1
) -> list[int]:
    return await nixl_stream_send(
        st, size, iters, reps, warmup, batch=NIXL_BATCH, window=NIXL_BATCH_WINDOW
    )


nixl64_stream_recv = nixl_stream_recv


async def nixl_pingpong(
    st: PeerState, initiator: bool, size: int, iters: int, reps: int = 1, warmup: int = 1
) -> list[int]:
    ag = st.nx
    loc, rem = _nx_lists(st, size, 1)
    h = ag.make_prepped_xfer("WRITE", loc, [0], rem, [0], b"p")  # notifies on arrival
    n = iters * (reps + warmup)
    rtts = [0] * n
    clock = time.perf_counter_ns
    try:
        for i in range(n):
            if initiator:
                t0 = clock()
                # without a progress thread the notification leaves while the poster
                # checks the transfer: wait for DONE, then for the answer
                if not _nx_post(ag, h):
                    _nx_done(ag, h)
                _nx_wait(st)
                rtts[i] = clock() - t0
            else:
                _nx_wait(st)
                if not _nx_post(ag, h):
                    _nx_done(ag, h)
    finally:
        h.release()
        loc.release()
        rem.release()
    return rtts[iters * warmup :] if initiator else []


# ---------------------------------------------------------------- Mooncake Transfer Engine (tcp)
#
# One TransferEngine per worker process, initialize(127.0.0.1, "P2PHANDSHAKE", "tcp", ""):
# no metadata server, each engine listens on a port of its own (get_rpc_port) and the
# runner hands each side the other's "127.0.0.1:PORT" session and buffer address. A stream
# submits single writes (transfer_submit_write), ``MOONCAKE_WINDOW`` in flight, each
# polled with transfer_check_status; then one 1-byte write that carries a notification
# (transfer_sync with a TransferNotify), which the receiver sees in get_notifies and
# answers in kind. Pingpong: transfer_sync with a notification, each way.

MOONCAKE_WINDOW = 64


async def mooncake_open(st: PeerState, nbytes: int) -> dict[str, Any]:
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")  # else its INFO and WARNING lines on stderr
    from mooncake.engine import TransferEngine

    st.hard_exit = True
    st.mc = TransferEngine()
    rc = st.mc.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        raise RuntimeError(f"Mooncake TransferEngine.initialize failed ({rc})")
    st.mc_buf = np.ones(max(nbytes, 64), np.uint8)
    rc = st.mc.register_memory(int(st.mc_buf.ctypes.data), st.mc_buf.nbytes)
    if rc != 0:
        raise RuntimeError(f"Mooncake register_memory failed ({rc})")
    return {"session": f"127.0.0.1:{st.mc.get_rpc_port()}", "addr": int(st.mc_buf.ctypes.data)}


async def mooncake_connect(st: PeerState, peer: dict[str, Any]) -> None:
    st.mc_peer, st.mc_raddr = str(peer["session"]), int(peer["addr"])


def _mc_notify(st: PeerState, msg: str) -> None:
    """A 1-byte write that carries a notification; returns once it is delivered."""
    from mooncake.engine import TransferNotify, TransferOpcode

    rc = st.mc.transfer_sync(st.mc_peer, int(st.mc_buf.ctypes.data), st.mc_raddr, 1,
                             TransferOpcode.Write, TransferNotify("afbench", msg))  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"Mooncake transfer_sync failed ({rc})")


def _mc_wait(st: PeerState, count: int = 1) -> None:
    deadline = time.monotonic() + PEER_TIMEOUT_S
    get = st.mc.get_notifies
    while st.mc_pending < count:
        st.mc_pending += len(get())
        if st.mc_pending < count and time.monotonic() > deadline:
            raise TimeoutError(f"no Mooncake notification from {st.mc_peer} in {PEER_TIMEOUT_S} s")
    st.mc_pending -= count


def _mc_done(te: Any, bid: int) -> None:
    status = te.transfer_check_status(bid)
    if status == 0:
        deadline = time.monotonic() + PEER_TIMEOUT_S
        while status == 0:
            status = te.transfer_check_status(bid)
            if status == 0 and time.monotonic() > deadline:
                raise TimeoutError(f"Mooncake write not done in {PEER_TIMEOUT_S} s")
    if status != 1:
        raise RuntimeError(f"Mooncake write failed (transfer_check_status {status})")


async def mooncake_stream_send(
    st: PeerState, size: int, iters: int, reps: int, warmup: int = 1
) -> list[int]:
    te, peer, src, dst = st.mc, st.mc_peer, int(st.mc_buf.ctypes.data), st.mc_raddr
    sz = max(size, 1)
    submit = te.transfer_submit_write
    w = max(1, min(MOONCAKE_WINDOW, iters))
    out = []
    for r in range(warmup + reps):
        t0 = time.perf_counter_ns()
        ring: list[int] = []
        for j in range(iters):
            if j >= w:
                _mc_done(te, ring[j % w])
            bid = submit(peer, src, dst, sz)
            if bid < 0:
                raise RuntimeError(f"Mooncake transfer_submit_write failed ({bid})")
            if j < w:
                ring.append(bid)
            else:
                ring[j % w] = bid
        for j in range(max(0, iters - w), iters):
            _mc_done(te, ring[j % w])
        _mc_notify(st, "end")
        _mc_wait(st)  # the receiver's acknowledgement
        dt = time.perf_counter_ns() - t0
        if r >= warmup:
            out.append(dt)
    return out


async def mooncake_stream_recv(
    st: PeerState, size: int, iters: int, reps: int, warmup: int = 1
) -> None:
    for _ in range(warmup + reps):
        _mc_wait(st)
        _mc_notify(st, "ack")


async def mooncake_pingpong(
    st: PeerState, initiator: bool, size: int, iters: int, reps: int = 1, warmup: int = 1
) -> list[int]:
    from mooncake.engine import TransferNotify, TransferOpcode

    te, peer, src, dst = st.mc, st.mc_peer, int(st.mc_buf.ctypes.data), st.mc_raddr
    sz, op, note = max(size, 1), TransferOpcode.Write, TransferNotify("afbench", "p")
    n = iters * (reps + warmup)
    rtts = [0] * n
    clock = time.perf_counter_ns
    for i in range(n):
        if initiator:
            t0 = clock()
            if te.transfer_sync(peer, src, dst, sz, op, note) != 0:
                raise RuntimeError("Mooncake transfer_sync failed")
            _mc_wait(st)
            rtts[i] = clock() - t0
        else:
            _mc_wait(st)
            if te.transfer_sync(peer, src, dst, sz, op, note) != 0:
                raise RuntimeError("Mooncake transfer_sync failed")
    return rtts[iters * warmup :] if initiator else []
