"""The runner: starts the worker pair, runs suites point by point, builds rows."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

import numpy as np

from ..transport.counting import expected_imms
from . import peers as peerlib
from .devices import GPU_SUITES, parse_device, resolve, unavailable
from .schema import add_ratios, make_row
from .suites import SUITES, Point, points
from .worker import Worker, WorkerError

CORE_IMPLS = ("asyncfabric", "batch", "raw")
# the roles each core impl streams with: (sender prefix, receiver prefix)
_STREAM_ROLES = {"asyncfabric": ("af", "af"), "batch": ("batch", "af"), "raw": ("raw", "raw")}
# A baseline outside the worker pair: af_indep.c (independent/), libfabric alone, in two
# processes of its own, pinned; it runs the write (bw) and pingpong suites.
INDEPENDENT_IMPLS = ("independent",)
INDEPENDENT_SUITES = ("write", "pingpong")
INDEPENDENT_PROVIDERS = ("shm", "tcp")
INDEPENDENT_WINDOW = 64  # writes in flight, as the asyncfabric rows' 64 lanes
PEER_BACKEND = {"zmq": ("zmq", "ipc"), "gloo": ("gloo", "tcp"), "ucxx": ("ucx", "auto"),
                "nixl": ("ucx", "auto"), "nixl64": ("ucx", "auto"),
                "mooncake": ("mooncake", "tcp")}  # fmt: skip


def _worker_cpus(workers: int) -> tuple[list[int] | None, list[int] | None]:
    """Where the two engines' workers go when there are several: CPUs 2.. for the
    sender's, the next ones for the receiver's (CPUs 0 and 1 are left to the
    processes' Python threads); None (not pinned) when the machine lacks the CPUs."""
    if workers <= 1:
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 + 2 * workers:
        return None, None
    return cpus[2 : 2 + workers], cpus[2 + workers : 2 + 2 * workers]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    """``async with Runner(...) as r: rows = await r.run_suite("write")``."""

    def __init__(
        self,
        provider: str = "shm",
        impls: tuple[str, ...] = ("asyncfabric", "raw"),
        *,
        quick: bool = False,
        repeats: int | None = None,
        policy: str = "auto",
        node: str | None = None,
        connect: str | None = None,
        authkey: bytes = b"asyncfabric-bench",
        on_point: Callable[[str, dict[str, Any] | None], None] | None = None,
        device: str = "cpu",
    ) -> None:
        known = CORE_IMPLS + INDEPENDENT_IMPLS + peerlib.PEER_IMPLS
        unknown = [i for i in impls if i not in known]
        if unknown:
            raise ValueError(f"unknown impls {unknown}; choose from {known}")
        self.provider, self.quick, self.policy = provider, quick, policy
        self.node = node or ("127.0.0.1" if provider == "tcp" and not connect else None)
        self.core = [i for i in impls if i in CORE_IMPLS]
        want_peers = tuple(i for i in impls if i in peerlib.PEER_IMPLS)
        self.peers, self.skipped = peerlib.availability(want_peers)
        self.repeats = repeats
        # --device: CUDA tensors instead of host numpy buffers (write and pingpong only)
        self.devices = parse_device(device)
        self.device_skip = unavailable(self.devices) if self.devices.cuda else None
        if self.devices.cuda:
            if self.device_skip:
                self.skipped["device"] = self.device_skip
            else:
                import torch

                self.devices = resolve(self.devices, torch.cuda.device_count())
            if "raw" in self.core:
                self.core.remove("raw")
                self.skipped["raw"] = (
                    "raw: its C loop reads host memory; with --device cuda the baseline "
                    "is torch_copy (torch's own copy between the same devices)"
                )
            if "batch" in self.core:
                self.core.remove("batch")
                self.skipped["batch"] = (
                    "batch: not run with --device cuda (GPU sources take the staged "
                    "wrapper's per-write path, which the asyncfabric rows measure)"
                )
            for i in self.peers:
                self.skipped[i] = f"{i}: not run with --device cuda (host buffers only)"
            self.peers = []
        if connect:
            for i in [i for i in self.peers if i in peerlib.OWN_WORKERS]:
                self.peers.remove(i)
                self.skipped[i] = (f"{i} skipped: runs only on workers this runner spawns "
                                   "(its library crashes at process exit), not with --connect")  # fmt: skip
        self.independent = "independent" in impls
        if self.independent:
            why = self._independent_skip(provider, connect)
            if why:
                self.independent = False
                self.skipped["independent"] = why
        self._connect, self._authkey = connect, authkey
        self._on_point = on_point or (lambda what, row: None)
        self._imm = 1000
        self.info: dict[str, Any] = {}

    async def __aenter__(self) -> Runner:
        self.tx = Worker.spawn("afbench-sender")
        self.rx = (
            Worker.connect(self._connect, self._authkey)
            if self._connect
            else Worker.spawn("afbench-receiver")
        )
        await asyncio.gather(self.tx.ready(), self.rx.ready())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(self.tx.aclose(), self.rx.aclose())

    def _imms(self) -> tuple[int, int]:
        self._imm += 2
        return self._imm, self._imm + 1

    def skipped_list(self) -> list[dict[str, str]]:
        return [{"impl": k, "reason": v} for k, v in self.skipped.items()]

    # ------------------------------------------------------------ engines

    async def _open(
        self, tx_bytes: int, rx_bytes: int, receivers: int = 1, domains: int = 1,
        workers: int = 1,
    ) -> None:  # fmt: skip
        kw = {"provider": self.provider, "domains": domains, "policy": self._suite_policy,
              "node": self.node, "workers": workers}  # fmt: skip
        dv = self.devices
        # Workers pinned: the sender's to the CPUs after the first two (its Python and
        # the receiver's), the receiver's after those.
        tx_cpus, rx_cpus = _worker_cpus(workers)
        txd, rxd = await asyncio.gather(
            self.tx.call("open_engines", count=1, nbytes=tx_bytes, device=dv.tx, cpus=tx_cpus,
                         **kw),
            self.rx.call("open_engines", count=receivers, nbytes=rx_bytes, device=dv.rx,
                         cpus=rx_cpus, **kw),
        )  # fmt: skip
        a, _ = await asyncio.gather(
            self.tx.call("connect", descs=rxd), self.rx.call("connect", descs=txd)
        )
        self.info = a
        self.chunk = 1 << 20  # the engines' default chunk_bytes

    async def _close(self) -> None:
        await asyncio.gather(self.tx.call("close_engines"), self.rx.call("close_engines"))

    # ------------------------------------------------------------ one point

    def _row(self, suite: str, impl: str, p: Point, times: list[int], *, bytes_per_rep: int,
             ops_per_rep: int, rtts: list[int] | None = None) -> dict[str, Any]:  # fmt: skip
        if impl == "torch_copy":
            backend, prov = "torch", self.info.get("provider", self.provider)
        elif impl in CORE_IMPLS or impl == "independent":
            backend, prov = (
                self.info.get("backend", "libfabric"),
                self.info.get("provider", self.provider),
            )
        else:
            backend, prov = PEER_BACKEND[impl]
        row = make_row(
            suite=suite, impl=impl, backend=backend, provider=prov, size_bytes=p.size,
            iters=ops_per_rep, times_ns=times, bytes_per_rep=bytes_per_rep, ops_per_rep=ops_per_rep,
            pages=p.pages, peers=p.peers, counters=p.counters, domains=p.domains,
            workers=p.workers, rtts_ns=rtts,
            policy=self._suite_policy if impl in CORE_IMPLS else "",
            device=self.devices.label(self.info.get("cuda_path", "")),
        )  # fmt: skip
        self._on_point(suite, row)
        return row

    def _window(self, impl: str, size: int, domains: int) -> int:
        if impl == "raw":
            return int(self.info.get("tx_credits", 256)) * domains
        # asyncfabric: concurrent awaiting coroutines ("lanes"). Injected writes
        # finish inside the call, so one lane is best; larger ones need overlap.
        # Measured here (shm with CMA, 2 cores, 1 MiB, two runs side by side): 16 lanes
        # 0.68-0.73 of raw, 32 lanes 0.76-0.90, 64 lanes 0.85-0.96 (raw keeps the
        # provider's whole tx window in flight).
        return 1 if size <= int(self.info.get("inject_size", 64)) else 64

    async def _stream_times(self, impl: str, p: Point, reps: int, warmup: int) -> list[int]:
        imm, ack = self._imms()
        per_engine = (p.iters // p.peers) * expected_imms(p.size, chunk_bytes=self.chunk)
        pre, rx_pre = _STREAM_ROLES[impl]
        extra = {"slots": p.slots} if p.slots > 1 and impl in ("asyncfabric", "batch") else {}
        times, _ = await asyncio.gather(
            self.tx.call(f"{pre}_stream_send", size=p.size, iters=p.iters, targets=p.peers,
                         window=self._window(impl, p.size, p.domains), imm=imm, ack=ack,
                         reps=reps, warmup=warmup, **extra),
            self.rx.call(f"{rx_pre}_stream_recv", per_engine=per_engine, imm=imm, ack=ack,
                         reps=reps, warmup=warmup),
        )  # fmt: skip
        return times

    async def _rounds(
        self, suite: str, pts: list[Point], reps: int, fresh: bool = True
    ) -> list[dict[str, Any]]:
        """Every core impl at every point, one repeat of each per round.

        This machine's speed drifts by tens of percent over seconds. Within a
        point the impls alternate (A B, B A, ...), so a ratio compares neighbours
        in time; across points, rounds make the drift hit every point alike
        (the scale target compares 64 peers x 10,000 counters with 1 x 1).
        ``fresh``: each point on engines opened (and its background counters
        armed) for it in every round, else on the open ones, warmed up once."""

        # raw drives every domain of an engine from one thread through the hook, which
        # stops its workers: with several workers it is not the comparison (and on two
        # cores its loops starve), so those points have no raw row.
        def impls(p: Point) -> list[str]:
            return [i for i in self.core if not (i == "raw" and p.workers > 1)]

        times: dict[tuple[Point, str], list[int]] = {(p, i): [] for p in pts for i in impls(p)}
        for r in range(reps):
            for p in pts:
                if fresh:
                    await self._open(p.size * p.slots, p.size * p.slots, receivers=p.peers,
                                     domains=p.domains, workers=p.workers)  # fmt: skip
                if p.counters > 1 and (fresh or r == 0):
                    await self.rx.call("arm_background", counters=p.counters)
                for impl in impls(p) if r % 2 == 0 else impls(p)[::-1]:
                    warm = 1 if fresh or r == 0 else 0
                    times[p, impl] += await self._stream_times(impl, p, 1, warm)
                if fresh:
                    await self._close()
        return [
            self._row(
                suite, impl, p, times[p, impl], bytes_per_rep=p.size * p.iters, ops_per_rep=p.iters
            )  # fmt: skip
            for p in pts
            for impl in impls(p)
        ]

    async def _torch_copy(self, p: Point, reps: int) -> dict[str, Any]:
        dv = self.devices
        times = await self.tx.call("torch_copy_send", size=p.size, iters=p.iters, src=dv.tx,
                                   dst=dv.rx, reps=reps)  # fmt: skip
        return self._row("write", "torch_copy", p, times, bytes_per_rep=p.size * p.iters,
                         ops_per_rep=p.iters)  # fmt: skip

    def _independent_skip(self, provider: str, connect: str | None) -> str | None:
        """Why af_indep.c cannot run here, or None."""
        if self.devices.cuda:
            return "independent: not run with --device cuda (af_indep.c moves host buffers)"
        if connect:
            return ("independent skipped: af_indep.c runs both its processes on this host, "
                    "not with --connect")  # fmt: skip
        if provider not in INDEPENDENT_PROVIDERS:
            return (f"independent skipped: af_indep.c runs on "
                    f"{' and '.join(INDEPENDENT_PROVIDERS)}, not {provider}")  # fmt: skip
        from . import independent

        ok, why = independent.available()
        return None if ok else f"independent skipped: {why}"

    async def _independent(self, suite: str, p: Point, reps: int) -> list[dict[str, Any]]:
        """af_indep.c at one point: its own sender and receiver, pinned to two CPUs.

        A failure (a libfabric error, or the receiver's check of the bytes) is
        reported in ``skipped`` and ends the independent rows of this run."""
        from . import independent

        mode = "bw" if suite == "write" else "pingpong"
        try:
            res = await asyncio.to_thread(
                independent.run_pair, self.provider, mode, p.size, p.iters, INDEPENDENT_WINDOW,
                reps, cpus=independent.default_cpus(), node=self.node,
            )  # fmt: skip
        except RuntimeError as exc:
            self.independent = False
            self.skipped["independent"] = f"independent failed in {suite} at {p.size} B: {exc}"
            self._on_point(suite, None)
            return []
        if mode == "bw":
            return [self._row(suite, "independent", p, res["times_ns"],
                              bytes_per_rep=p.size * p.iters, ops_per_rep=p.iters)]  # fmt: skip
        rtts = res["rtts_ns"]
        return [self._row(suite, "independent", p, [sum(rtts)], rtts=rtts,
                          bytes_per_rep=2 * p.size * len(rtts), ops_per_rep=len(rtts))]  # fmt: skip

    async def _pairs(self, p: Point, reps: int) -> list[dict[str, Any]]:
        """K = p.peers pairs of processes at once, pair k pinned to CPUs 2k and 2k+1:
        batch streams of engines, then af_indep pairs. A repeat's aggregate is every
        pair's bytes over the slowest pair's time (they start together)."""
        k = p.peers
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2 * k:
            self.skipped[f"pairs K={k}"] = (
                f"pairs: K={k} needs {2 * k} CPUs, this machine has {len(cpus)}"
            )
            self._on_point("pairs", None)
            return []
        rows = []
        if "batch" in self.core:
            ws = [(Worker.spawn(f"afbench-p{i}-tx"), Worker.spawn(f"afbench-p{i}-rx"))
                  for i in range(k)]  # fmt: skip
            try:
                await asyncio.gather(*(w.ready() for pair in ws for w in pair))
                kw = {"provider": self.provider, "policy": "default", "node": self.node}
                for i, (tx, rx) in enumerate(ws):
                    await asyncio.gather(tx.call("pin", cpus=[cpus[2 * i]]),
                                         rx.call("pin", cpus=[cpus[2 * i + 1]]))  # fmt: skip
                    txd, rxd = await asyncio.gather(
                        tx.call("open_engines", nbytes=p.size, **kw),
                        rx.call("open_engines", nbytes=p.size, **kw),
                    )
                    await asyncio.gather(
                        tx.call("connect", descs=rxd), rx.call("connect", descs=txd)
                    )
                imm, ack = self._imms()
                per = p.iters * expected_imms(p.size, chunk_bytes=1 << 20)  # default chunk
                calls = []
                for tx, rx in ws:
                    calls.append(tx.call("batch_stream_send", size=p.size, iters=p.iters, targets=1,
                                         window=64, imm=imm, ack=ack, reps=reps))  # fmt: skip
                    calls.append(rx.call("af_stream_recv", per_engine=per, imm=imm, ack=ack,
                                         reps=reps))  # fmt: skip
                res = await asyncio.gather(*calls)
                times = [max(res[2 * i][r] for i in range(k)) for r in range(reps)]
                rows.append(self._row("pairs", "batch", p, times, bytes_per_rep=k * p.size * p.iters,
                                      ops_per_rep=k * p.iters))  # fmt: skip
            finally:
                await asyncio.gather(*(w.aclose() for pair in ws for w in pair))
        if self.independent:
            from . import independent

            try:
                res = await asyncio.gather(*(
                    asyncio.to_thread(independent.run_pair, self.provider, "bw", p.size, p.iters,
                                      INDEPENDENT_WINDOW, reps, cpus=(cpus[2 * i], cpus[2 * i + 1]),
                                      node=self.node)
                    for i in range(k)
                ))  # fmt: skip
            except RuntimeError as exc:
                self.skipped["independent"] = f"independent failed in pairs at K={k}: {exc}"
                return rows
            times = [max(r_["times_ns"][r] for r_ in res) for r in range(reps)]
            rows.append(self._row("pairs", "independent", p, times,
                                  bytes_per_rep=k * p.size * p.iters, ops_per_rep=k * p.iters))  # fmt: skip
        return rows

    def _bytes_per_rep(self) -> int | None:
        # NVLink moves ~380 GB/s: 64 MiB a repeat would be 0.2 ms, under the ack's
        # round trip; the staged path is bounded by host bandwidth (a few GB/s).
        if not self.devices.cuda:
            return None
        return (4 << 30) if self.info.get("backend") == "cuda_ipc" else (512 << 20)

    async def _peer_stream(self, suite: str, impl: str, p: Point, reps: int) -> dict[str, Any]:
        kw = {"size": p.size, "iters": p.iters, "reps": reps}
        times, _ = await asyncio.gather(
            self.tx.call(f"{impl}_stream_send", **kw), self.rx.call(f"{impl}_stream_recv", **kw)
        )
        return self._row(suite, impl, p, times, bytes_per_rep=p.size * p.iters, ops_per_rep=p.iters)

    async def _pingpong(self, impl: str, p: Point, reps: int) -> dict[str, Any]:
        kw: dict[str, Any] = {"size": p.size, "iters": p.iters, "reps": reps}
        if impl in CORE_IMPLS:
            kw["ping"], kw["pong"] = self._imms()
            fn = "af_pingpong" if impl == "asyncfabric" else "raw_pingpong"
        else:
            fn = f"{impl}_pingpong"
        rtts, _ = await asyncio.gather(
            self.tx.call(fn, initiator=True, **kw), self.rx.call(fn, initiator=False, **kw)
        )
        total = sum(rtts)
        return self._row("pingpong", impl, p, [total], bytes_per_rep=2 * p.size * len(rtts),
                         ops_per_rep=len(rtts), rtts=rtts)  # fmt: skip

    async def _paged(self, impl: str, p: Point, reps: int, maps: list[list[int]]) -> dict[str, Any]:
        imm, ack = self._imms()
        if impl == "batch":
            send = self.tx.call("batch_paged_send", size=p.size, pages=maps,
                                dst_stride=2 * p.size, imm=imm, ack=ack, reps=reps)  # fmt: skip
        elif impl == "asyncfabric":
            send = self.tx.call("af_paged_send", size=p.size, pages=maps, dst_stride=2 * p.size,
                                imm=imm, ack=ack, reps=reps)  # fmt: skip
        else:
            send = self.tx.call("raw_stream_send", size=p.size, iters=1, targets=1,
                                window=self._window("raw", p.size, 1), imm=imm, ack=ack, reps=reps,
                                pages=maps, dst_stride=2 * p.size)  # fmt: skip
        pre = _STREAM_ROLES[impl][1]
        times, _ = await asyncio.gather(
            send,
            self.rx.call(f"{pre}_stream_recv", per_engine=p.pages, imm=imm, ack=ack, reps=reps),
        )
        return self._row(
            "paged", impl, p, times, bytes_per_rep=p.size * p.pages, ops_per_rep=p.pages
        )

    # ------------------------------------------------------------ peers setup

    async def _peers_open(self, impl: str, nbytes: int = 0) -> None:
        if impl == "zmq":
            ep = peerlib.zmq_endpoint()
            await asyncio.gather(
                self.tx.call("zmq_open", bind=True, endpoint=ep),
                self.rx.call("zmq_open", bind=False, endpoint=ep),
            )
        elif impl == "gloo":
            port = _free_port()
            await asyncio.gather(
                self.tx.call("gloo_open", rank=0, port=port),
                self.rx.call("gloo_open", rank=1, port=port),
            )
        elif impl == "ucxx":
            port = _free_port()
            await self.rx.call("ucxx_listen", port=port)
            await asyncio.gather(
                self.rx.call("ucxx_accept"),
                self.tx.call("ucxx_connect", host="127.0.0.1", port=port),
            )
        elif impl in ("nixl", "nixl64"):  # agents named apart: both metadata land in each
            a, b = await asyncio.gather(
                self.tx.call("nixl_open", agent=f"afbench-{impl}-sender", nbytes=nbytes),
                self.rx.call("nixl_open", agent=f"afbench-{impl}-receiver", nbytes=nbytes),
            )
            await asyncio.gather(
                self.tx.call("nixl_connect", peer=b), self.rx.call("nixl_connect", peer=a)
            )
        elif impl == "mooncake":
            a, b = await asyncio.gather(
                self.tx.call("mooncake_open", nbytes=nbytes),
                self.rx.call("mooncake_open", nbytes=nbytes),
            )
            await asyncio.gather(
                self.tx.call("mooncake_connect", peer=b), self.rx.call("mooncake_connect", peer=a)
            )

    async def _peer_rows(self, name: str, impl: str, pts: list[Point], reps: int
                         ) -> list[dict[str, Any]]:  # fmt: skip
        async def measure() -> list[dict[str, Any]]:
            await self._peers_open(impl, nbytes=max(p.size for p in pts))
            return [await (self._peer_stream(name, impl, p, reps) if name == "write"
                           else self._pingpong(impl, p, reps)) for p in pts]  # fmt: skip

        if impl not in peerlib.OWN_WORKERS:
            return await measure()
        if name == "pingpong" and impl == "nixl64":  # batching is for streams: that is nixl's
            for _ in pts:
                self._on_point(name, None)
            return []
        # NIXL and Mooncake crash at process exit: a worker pair of their own for each run,
        # whose exit status is not looked at; one that dies mid-run skips the peer.
        shared = self.tx, self.rx
        self.tx = Worker.spawn(f"afbench-{impl}-sender")
        self.rx = Worker.spawn(f"afbench-{impl}-receiver")
        try:
            await asyncio.gather(self.tx.ready(), self.rx.ready())
            return await measure()
        except WorkerError as exc:
            first = (str(exc).strip().splitlines() or ["worker died"])[0]
            self.skipped[impl] = f"{impl} failed in {name}: {first}"
            return []
        finally:
            await asyncio.gather(self.tx.aclose(), self.rx.aclose())
            self.tx, self.rx = shared

    # ------------------------------------------------------------ suites

    async def run_suite(self, name: str, sizes: list[int] | None = None,
                        iters: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
        suite = SUITES[name]
        # "auto": round trips want the latency policy (long spins on both sides);
        # streams keep the default, which is what an application gets.
        self._suite_policy = (
            ("latency" if name == "pingpong" else "default")
            if self.policy == "auto"
            else self.policy
        )
        if self.devices.cuda and (self.device_skip or name not in GPU_SUITES):
            if not self.device_skip:
                self.skipped[name] = (
                    f"{name}: runs on host memory only; --device applies to "
                    f"{' and '.join(GPU_SUITES)}"
                )
            return []
        pts = points(name, self.quick, sizes, iters)
        reps = self.repeats or (1 if self.quick else suite.reps)
        rows: list[dict[str, Any]] = []
        if name in ("write", "pingpong"):
            big = max(p.size for p in pts)
            await self._open(big, big)
            budget = self._bytes_per_rep()
            if budget and name == "write" and not self.quick:
                pts = points(name, self.quick, sizes, iters, budget=budget)
            for p in pts:
                if self.devices.cuda and name == "write":
                    rows.append(await self._torch_copy(p, reps))
                if name == "write":
                    rows += await self._rounds(name, [p], reps, fresh=False)
                else:
                    for impl in self.core:
                        if impl != "batch":  # a round trip is one write each way
                            rows.append(await self._pingpong(impl, p, reps))
                if self.independent and name in INDEPENDENT_SUITES:
                    rows += await self._independent(name, p, reps)
            await self._close()
            for impl in self.peers:
                rows += await self._peer_rows(name, impl, pts, reps)
        elif name == "paged":
            rng = np.random.default_rng(7)
            for p in pts:
                maps = [rng.permutation(p.pages).tolist(), rng.permutation(p.pages).tolist()]
                await self._open(p.size * p.pages, 2 * p.size * p.pages)
                for impl in self.core:
                    rows.append(await self._paged(impl, p, reps, maps))
                await self._close()
        elif name == "pairs":
            for p in pts:
                rows += await self._pairs(p, reps)
        else:  # fanout, scale, domains, workers: one sender engine, p.peers receiver engines
            rows += await self._rounds(name, pts, reps)
        add_ratios(rows)
        return rows
