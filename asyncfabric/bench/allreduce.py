"""``asyncfabric bench allreduce``: all-reduce side by side with torch.distributed gloo.

asyncfabric bench allreduce --provider tcp --ranks 2 --sizes 8K-256M --json out.json
asyncfabric bench allreduce --link-rate 10gbit     # every rank in its own network namespace
asyncfabric bench allreduce --accuracy [--decode]   # errors, not speed: allreduce_accuracy.py

P processes (spawned), each with one engine joined to one group (an embedded
store served by this process) and one gloo process group over loopback; with
``--link-rate`` (tcp, root) each rank runs in its own network namespace behind a
bridge, every port limited to that rate each way by ``tc`` (``bench/shaped.py``), and
everything (asyncfabric, gloo, the store) goes over that link. Every size runs every
implementation in rounds (one repeat of each,
in turn, ``--repeats`` rounds) so drift hits them alike. A repeat is ``iters``
back-to-back all-reduces after a barrier; its time is the slowest rank's.
Rows: latency (µs per all-reduce, median of repeats) and algorithm bandwidth
(tensor bytes / latency, GB/s), per implementation:

* ``af`` (quant=None) and ``af-int8`` (quant="int8") on bf16 tensors, ``af-fp32``;
* ``gloo`` (``dist.all_reduce``) on the same bf16 tensors, and ``gloo-fp32``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import queue
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

IMPLS = ("gloo", "af", "af-int8", "gloo-fp32", "af-fp32")
DEFAULT_SIZES = "8K,32K,128K,512K,1M,2M,8M,32M,128M,256M"


def _size(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _iters(size: int) -> int:
    # about 20 MiB of tensor per repeat, 2 to 200 calls
    return max(2, min(200, (20 << 20) // max(size, 1)))


async def _rank_main(rank: int, args: dict[str, Any], q: Any) -> None:
    import torch
    import torch.distributed as dist

    import asyncfabric as af
    from asyncfabric.collectives import AllReduce

    P = args["ranks"]
    host = args["addrs"][0] if args["addrs"] else "127.0.0.1"
    dist.init_process_group(
        "gloo", init_method=f"tcp://{host}:{args['port']}", rank=rank, world_size=P
    )
    kw: dict[str, Any] = {}
    if args["policy"] != "default":
        kw["progress"] = getattr(af.ProgressPolicy, args["policy"])()
    if args["provider"] == "tcp":
        kw["node"] = args["addrs"][rank] if args["addrs"] else "127.0.0.1"
    async with af.Engine(args["provider"], **kw) as eng:
        store = await af.store.connect(args["store"], secret=args["secret"])
        grp = await af.join(store, group="bench-allreduce", name=f"r{rank:04d}", engine=eng, ttl=30)
        view = await grp.wait_for(P, timeout=120)
        ar = AllReduce(view, oneshot_bytes=args["oneshot"], **args["ar_kw"])
        flag = torch.zeros(1)
        for size in args["sizes"]:
            n16, n32 = max(1, size // 2), max(1, size // 4)
            g = torch.Generator().manual_seed(rank)
            x16 = torch.randn(n16, generator=g).bfloat16().to(args["device"])
            x32 = torch.randn(n32, generator=g).to(args["device"])
            bufs = {"16": x16.clone(), "32": x32.clone()}
            iters = _iters(size)
            times: dict[str, list[float]] = {i: [] for i in args["impls"]}
            cpus: dict[str, list[float]] = {i: [] for i in args["impls"]}

            async def one(impl: str, bufs: dict[str, Any] = bufs) -> None:
                t = bufs["32" if impl.endswith("fp32") else "16"]
                if impl.startswith("gloo"):
                    dist.all_reduce(t)
                else:
                    await ar(t, quant="int8" if impl == "af-int8" else None, timeout=60)

            for rep in range(args["repeats"] + 1):
                for impl in args["impls"]:
                    if args["device"] != "cpu":
                        torch.cuda.synchronize()
                    tracing = bool(args["trace"]) and rep == args["repeats"]
                    sampler = _LinkSampler(args["iface"] or "lo") if tracing else None
                    if tracing and impl.startswith("af"):
                        ar.trace = []
                    dist.barrier()
                    c0, t0 = time.process_time(), time.perf_counter()
                    for _ in range(iters):
                        await one(impl)
                    if sampler is not None:
                        _dump_trace(args["trace"], rank, size, impl, t0, ar.trace, sampler.stop())
                        ar.trace = None
                    if args["device"] != "cpu":
                        torch.cuda.synchronize()
                    dt = torch.tensor([time.perf_counter() - t0])
                    dc = torch.tensor([time.process_time() - c0])
                    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                    dist.all_reduce(dc)
                    if rep:  # the first round warms up (registration, connections)
                        times[impl].append(dt.item() / iters)
                        cpus[impl].append(dc.item() / iters)
                    bufs["16"].copy_(x16)
                    bufs["32"].copy_(x32)
            if rank == 0:
                for impl, ts in times.items():
                    lat = statistics.median(ts)
                    q.put(
                        {
                            "suite": "allreduce",
                            "impl": impl,
                            "provider": args["provider"],
                            "link_rate_bps": args["link_rate"],
                            "ranks": P,
                            "dtype": "float32" if impl.endswith("fp32") else "bfloat16",
                            "size_bytes": size,
                            "device": args["device"],
                            "iters": iters,
                            "repeats": len(ts),
                            "lat_us": lat * 1e6,
                            "lat_max_us": max(ts) * 1e6,
                            "algbw_gbps": size / lat / 1e9,
                            # CPU seconds of all ranks' processes (every thread) per call:
                            # steadier than wall time on a loaded machine
                            "cpu_us": statistics.median(cpus[impl]) * 1e6,
                        }
                    )
        del flag
        ar.close()
        await grp.leave()
    dist.destroy_process_group()


class _LinkSampler:
    """Bytes sent and received on ``iface`` (this process's network namespace), sampled
    every ~100 µs from a thread, for ``--trace``: where the link idles."""

    def __init__(self, iface: str) -> None:
        self.iface = iface
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._fd = os.open("/proc/self/net/dev", os.O_RDONLY)
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _read(self) -> tuple[int, int]:
        text = os.pread(self._fd, 1 << 16, 0).decode()
        for line in text.splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == self.iface:
                f = rest.split()
                return int(f[0]), int(f[8])
        return 0, 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            rx, tx = self._read()
            self.samples.append((time.perf_counter(), rx, tx))
            time.sleep(0.0001)

    def stop(self) -> list[tuple[float, int, int]]:
        self._stop.set()
        self._t.join()
        os.close(self._fd)
        return self.samples


def _dump_trace(
    where: str,
    rank: int,
    size: int,
    impl: str,
    t0: float,
    events: list[tuple[float, str, int, int]] | None,
    samples: list[tuple[float, int, int]],
) -> None:
    os.makedirs(where, exist_ok=True)
    with open(os.path.join(where, f"{impl}_{size}_r{rank}.json"), "w") as f:
        json.dump({"t0": t0, "events": events or [], "link": samples}, f)


@contextlib.contextmanager
def _store(ns: str | None = None, host: str = "127.0.0.1") -> Iterator[tuple[str, str]]:
    """An embedded group store on ``host``, served from a thread of this process (inside
    network namespace ``ns`` if given: only that thread enters it)."""
    import asyncfabric as af

    secret = os.urandom(16).hex()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        if ns is not None:
            from .shaped import enter

            enter(ns)
        srv = await af.store.serve(f"{host}:0", secret=secret)
        box["url"], box["loop"], box["stop"] = srv.url, asyncio.get_running_loop(), asyncio.Event()
        ready.set()
        await box["stop"].wait()
        await srv.aclose()

    t = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    t.start()
    if not ready.wait(30):
        raise RuntimeError("the embedded group store did not start within 30 s")
    try:
        yield box["url"], secret
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        t.join(10)


def _worker(rank: int, args: dict[str, Any], q: Any) -> None:
    try:
        if args["netns"]:  # first, before any thread or socket exists
            from .shaped import enter

            enter(args["netns"][rank])
            os.environ["GLOO_SOCKET_IFNAME"] = args["iface"]
        asyncio.run(_rank_main(rank, args, q))
    except BaseException as exc:  # report, then let the parent fail the run
        q.put({"error": f"rank {rank}: {type(exc).__name__}: {exc}"})
        raise
    finally:
        q.put({"done": rank})


def _table(rows: list[dict[str, Any]]) -> str:
    by: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["size_bytes"], {})[r["impl"]] = r
    impls = [i for i in IMPLS if any(i in v for v in by.values())]
    head = f"{'size':>8} " + " ".join(f"{i + ' µs':>13}{'GB/s':>7}" for i in impls)
    ratios = []
    if "af-int8" in impls and "af" in impls:
        ratios.append(("int8/af", "af-int8", "af"))
    if "af" in impls and "gloo" in impls:
        ratios.append(("af/gloo", "af", "gloo"))
    if "af-int8" in impls and "gloo" in impls:
        ratios.append(("int8/gloo", "af-int8", "gloo"))
    head += "".join(f"{n:>10}" for n, _, _ in ratios)
    lines = [head]
    for size in sorted(by):
        v = by[size]
        s = f"{_fmt(size):>8} "
        for i in impls:
            row = v.get(i)
            s += f"{row['lat_us']:>13.1f}{row['algbw_gbps']:>7.2f}" if row else " " * 20
        for _, a, b in ratios:
            s += f"{v[b]['lat_us'] / v[a]['lat_us']:>9.2f}x" if a in v and b in v else " " * 10
        lines.append(s)
    return "\n".join(lines)


def _fmt(n: int) -> str:
    for unit, k in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    from .._cli import CliParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--accuracy" in argv:  # a different measurement, its own options
        from .allreduce_accuracy import main as accuracy_main

        return accuracy_main([x for x in argv if x != "--accuracy"])

    p = CliParser(prog="asyncfabric bench allreduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--provider", default="tcp", help="libfabric provider: tcp (default) or shm")
    p.add_argument("--ranks", type=int, default=2, help="processes (default 2)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"tensor bytes (default {DEFAULT_SIZES})")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument(
        "--oneshot",
        type=_size,
        default=None,
        help="one-shot threshold in bytes (default: built in)",
    )
    p.add_argument(
        "--policy",
        default="default",
        choices=("default", "latency", "low_cpu"),
        help="the engines' ProgressPolicy (default: ProgressPolicy())",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the tensors live: cpu, or cuda (every rank on cuda:0; run under CUDA MPS)",
    )
    p.add_argument("--piece", type=int, help="values per pipeline piece (default: built in)")
    p.add_argument("--round", type=int, help="values per two-shot round (default: built in)")
    p.add_argument(
        "--link-rate",
        help="tcp only, needs root and tc: run every rank in its own network namespace, "
        "on a bridge, every port limited to this rate each way (e.g. 2.5gbit, 10gbit)",
    )
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument(
        "--trace",
        help="write, for the last repeat, every rank's call events (af impls) and its "
        "link's byte counters (sampled every ~100 µs) as JSON files into this folder",
    )
    a = p.parse_args(argv)
    impls = [i.strip() for i in a.impls.split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        p.error(f"unknown --impls {', '.join(bad)}; choose from {', '.join(IMPLS)}")
    if not 2 <= a.ranks <= 32:
        p.error("--ranks must be from 2 to 32")
    try:
        sizes = [_size(s) for s in a.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes: not a list of sizes: {a.sizes!r} (example: 8K,1M,256M)")
    rate = None
    if a.link_rate is not None:
        from .shaped import parse_rate, shaped_available

        if a.provider != "tcp":
            p.error("--link-rate shapes a tcp link: use it with --provider tcp")
        try:
            rate = parse_rate(a.link_rate)
        except ValueError as exc:
            p.error(f"--link-rate: {exc}")
        reason = shaped_available()
        if reason is not None:
            p.error(f"--link-rate: cannot build a shaped link here: {reason}")
    with contextlib.ExitStack() as stack:
        link = None
        if rate is not None:
            from .shaped import ShapedLink

            link = stack.enter_context(ShapedLink(a.ranks, rate))
            print(
                f"shaped link: {a.ranks} namespaces on a bridge, {rate / 1e9:g} Gbit/s "
                f"each way a port (tbf burst {link.burst} B)",
                file=sys.stderr,
            )
        rows, errors = _run(a, sizes, impls, rate, link, stack)
    if errors:
        raise RuntimeError("; ".join(errors))
    where = "loopback" if rate is None else f"shaped link {rate / 1e9:g} Gbit/s"
    print(
        f"all-reduce, {a.ranks} ranks, provider {a.provider} ({where}), device {a.device}, "
        f"os.cpu_count()={os.cpu_count()}"
    )
    print(_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"suite": "allreduce", "rows": rows}, f, indent=1)
    return 0


def _run(
    a: Any, sizes: list[int], impls: list[str], rate: int | None, link: Any, stack: Any
) -> tuple[list[dict[str, Any]], list[str]]:
    """Serve the store, spawn the ranks, collect their rows; every rank is gone on return
    (a process left inside a namespace would keep it alive)."""
    from ..collectives import ONESHOT_BYTES

    store = _store() if link is None else _store(link.switch_ns, link.switch_addr)
    with store as (url, secret):
        args = {
            "store": url,
            "secret": secret,
            "provider": a.provider,
            "ranks": a.ranks,
            "sizes": sizes,
            "impls": impls,
            "repeats": max(1, a.repeats),
            "port": _free_port() if link is None else 29500,  # a fresh namespace: free
            "link_rate": rate,
            "netns": None if link is None else link.ns,
            "addrs": None if link is None else link.addr,
            "iface": None if link is None else link.iface,
            "policy": a.policy,
            "device": "cuda:0" if a.device == "cuda" else a.device,
            "ar_kw": {
                k: v
                for k, v in (("piece_elems", a.piece), ("round_elems", a.round))
                if v is not None
            },
            "oneshot": ONESHOT_BYTES if a.oneshot is None else a.oneshot,
            "trace": None if a.trace is None else os.path.abspath(a.trace),
        }
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, args, q)) for r in range(a.ranks)]

        def stop() -> None:
            for pr in procs:
                if pr.is_alive():
                    pr.terminate()
            for pr in procs:
                pr.join(5)
                if pr.is_alive():
                    pr.kill()
                    pr.join(5)

        stack.callback(stop)  # runs before the link is taken down, on errors too
        for pr in procs:
            pr.start()
        rows: list[dict[str, Any]] = []
        done, errors = 0, []
        while done < a.ranks:
            try:
                msg = q.get(timeout=5)
            except queue.Empty:
                dead = [pr for pr in procs if pr.exitcode not in (None, 0)]
                if dead:
                    errors.append(f"rank process exited with code {dead[0].exitcode}")
                    break
                continue
            if "done" in msg:
                done += 1
            elif "error" in msg:
                errors.append(msg["error"])
                for pr in procs:
                    if pr.is_alive():
                        pr.terminate()
                break
            else:
                rows.append(msg)
                print(
                    f"  {_fmt(msg['size_bytes']):>6} {msg['impl']:<10} {msg['lat_us']:10.1f} µs "
                    f"{msg['algbw_gbps']:6.2f} GB/s  cpu {msg['cpu_us']:10.1f} µs",
                    file=sys.stderr,
                    flush=True,
                )
        for pr in procs:
            pr.join(10)
        stop()
    return rows, errors
