"""``asyncfabric bench``: run suites, show progress and a result table, write JSON/CSV.

asyncfabric bench all --provider shm --json out.json --csv out.csv
asyncfabric bench write pingpong --quick
asyncfabric bench write pingpong --provider cuda_ipc --device cuda:0,cuda:1   # NVLink
asyncfabric bench write pingpong --provider shm --device cuda    # GPU staged through host
asyncfabric bench plot out.json --out plots/
asyncfabric bench kv --tokens 1024,4096,16384   # KV pages: asyncfabric.kv vs NIXL, Mooncake
asyncfabric bench allreduce --provider tcp --sizes 8K,1M,256M  # vs torch.distributed gloo
asyncfabric bench model --workers 1,4,8 --batch 1,16,64   # costs here -> throughput at scale
asyncfabric bench weights --sizes 0.5,2,4          # RL weight update vs write_many, naive, gloo
asyncfabric bench group --members 64   # join time and lookup p50, embedded store and etcd
asyncfabric bench moe --ep 2,4 --json moe.json       # MoE dispatch/combine vs gloo
asyncfabric bench serve --listen 10.0.0.2:7000     # on the other host
asyncfabric bench write --provider tcp --connect 10.0.0.2:7000 --node 10.0.0.1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

from . import schema
from .devices import parse_device
from .peers import PEER_IMPLS
from .runner import CORE_IMPLS, INDEPENDENT_IMPLS, Runner
from .suites import ORDER, points, select
from .worker import WorkerError


def _size(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 8, 4K, 1M)") from None


def _parser() -> argparse.ArgumentParser:
    from .._cli import CliParser

    p = CliParser(
        prog="asyncfabric bench",
        description="Benchmark asyncfabric against a raw C loop on the same provider and peer "
        "libraries. Suites: " + ", ".join(ORDER) + ". Also: `plot RESULT.json`, `serve --listen`.",
    )
    p.add_argument("suites", nargs="+", help="suites to run, or 'all'")
    p.add_argument("--provider", default="shm", help="libfabric provider (default shm)")
    p.add_argument(
        "--impls",
        default=",".join(CORE_IMPLS + INDEPENDENT_IMPLS + PEER_IMPLS),
        help="comma-separated: asyncfabric,raw,independent,ucxx,nixl,nixl64,mooncake,gloo,zmq "
        "(peers not installed are skipped)",
    )
    p.add_argument("--json", help="write rows to this JSON file")
    p.add_argument("--csv", help="write rows to this CSV file")
    p.add_argument("--quick", action="store_true", help="tiny grid, one repeat (for tests)")
    p.add_argument("--repeats", type=int, help="timed repeats per point (default 3)")
    p.add_argument("--sizes", type=lambda s: [_size(x) for x in s.split(",")], help="e.g. 8,4K,1M")
    p.add_argument("--iters", type=int, help="operations per repeat (overrides the suite's)")
    p.add_argument(
        "--policy",
        default="auto",
        choices=["auto", "default", "latency", "low_cpu"],
        help="engines' progress policy; auto: latency for pingpong, default for the rest",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the buffers live: cpu (default), cuda (sender GPU 0, receiver GPU 1), "
        "cuda:N, or SENDER,RECEIVER such as cuda:0,cuda:1; CUDA runs write and pingpong "
        "(with --provider cuda_ipc for NVLink, or a libfabric provider such as shm)",
    )
    p.add_argument("--node", help="local address to bind (tcp)")
    p.add_argument("--connect", help="HOST:PORT of a `bench serve` worker to be the receiver")
    p.add_argument(
        "--authkey", default=os.environ.get("ASYNCFABRIC_BENCH_KEY", "asyncfabric-bench")
    )
    p.add_argument("--no-progress", action="store_true", help="plain output (no progress bars)")
    return p


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _human(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n} B"


def render_table(rows: list[dict[str, Any]], skipped: list[dict[str, str]], console: Any) -> None:
    from rich.table import Table

    for suite in ORDER:
        rs = [r for r in rows if r["suite"] == suite]
        if not rs:
            continue
        devs = sorted({r.get("device", "cpu") for r in rs} - {"cpu"})
        t = Table(title=suite + (f" on {', '.join(devs)}" if devs else ""), show_lines=False)
        for col in ("impl", "size", "pages", "peers", "ctrs", "doms", "wkrs", "GB/s", "ops/s",
                    "p50 µs", "p99 µs", "vs raw", "vs indep"):  # fmt: skip
            t.add_column(col, justify="left" if col == "impl" else "right")
        for r in rs:
            t.add_row(
                r["impl"], _human(r["size_bytes"]), str(r["pages"]), str(r["peers"]),
                str(r["counters"]), str(r["domains"]), str(r.get("workers", 1)), _fmt(r["gbps"], 3),
                f"{r['ops_per_s']:.0f}",
                _fmt(r["lat_p50_us"]), _fmt(r["lat_p99_us"]), _fmt(r["ratio_vs_raw"], 3),
                _fmt(r.get("ratio_vs_independent"), 3),
            )  # fmt: skip
        console.print(t)
    for s in skipped:
        console.print(f"[yellow]{s['reason']}[/yellow]")


async def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    names = select(args.suites)
    impls = tuple(i.strip() for i in args.impls.split(",") if i.strip())
    info = schema.meta(["asyncfabric", "bench", *argv])
    rows: list[dict[str, Any]] = []
    prog = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=args.no_progress,
    )  # fmt: skip
    tasks: dict[str, Any] = {}

    def on_point(suite: str, row: dict[str, Any] | None) -> None:
        prog.advance(tasks[suite])
        if args.no_progress and row:
            console.print(
                f"{suite:8} {row['impl']:11} {_human(row['size_bytes']):>8} "
                f"p={row['peers']} c={row['counters']} d={row['domains']} "
                f"{row['gbps']:.3f} GB/s {row['ops_per_s']:.0f} ops/s p50 {row['lat_p50_us']:.2f} us"
            )

    t0 = time.monotonic()
    async with Runner(
        args.provider, impls, quick=args.quick, repeats=args.repeats, policy=args.policy,
        node=args.node, connect=args.connect, authkey=args.authkey.encode(), on_point=on_point,
        device=args.device,
    ) as runner:  # fmt: skip
        for s in runner.skipped.values():
            console.print(f"[yellow]{s}[/yellow]")
        with prog:
            try:
                for n in names:
                    npts = len(points(n, args.quick, args.sizes, args.iters))
                    nimpl = len(runner.core) + (
                        len(runner.peers) if n in ("write", "pingpong") else 0
                    )
                    nimpl += 1 if runner.devices.cuda and n == "write" else 0
                    nimpl += 1 if runner.independent and n in ("write", "pingpong") else 0
                    tasks[n] = prog.add_task(n, total=npts * nimpl)
                for n in names:
                    rows += await runner.run_suite(n, sizes=args.sizes, iters=args.iters)
            except BaseException:
                # a failure is one line (printed by asyncfabric.__main__): no bars around it
                if console.is_terminal:
                    prog.live.transient = True  # erased
                else:
                    console.quiet = True  # not even the final render a log file would get
                raise
        skipped = runner.skipped_list()
    info["elapsed_s"] = round(time.monotonic() - t0, 1)
    info["provider"] = args.provider
    info["device"] = args.device
    render_table(rows, skipped, Console(width=max(120, Console().width)))
    if args.json:
        schema.write_json(args.json, rows, skipped, info)
    if args.csv:
        schema.write_csv(args.csv, rows)
    console.print(f"done in {info['elapsed_s']} s")
    return 0


def _usage_error(message: str) -> int:
    print(f"asyncfabric bench: error: {message} (see asyncfabric bench --help)", file=sys.stderr)
    return 2


def _worker_error(exc: WorkerError) -> Exception:
    """A worker's error as the error it was: its report is ``role: ErrorClass: message``,
    then the worker's traceback (kept on ``exc``, shown with --debug)."""
    import asyncfabric

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else "benchmark worker failed"
    _role, _, rest = first.partition(": ")
    name, _, message = rest.partition(": ")
    cls = getattr(asyncfabric, name, None)
    if isinstance(cls, type) and issubclass(cls, asyncfabric.AsyncFabricError) and message:
        try:
            return cls(message)
        except TypeError:  # a constructor that wants more than a message
            pass
    return WorkerError(first)


def main(argv: list[str] | None = None) -> int:
    """``asyncfabric bench``; a failure raises (``asyncfabric.__main__`` prints it as one line)."""
    from .._cli import CliParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plot":
        from .plot import main as plot_main

        return plot_main(argv[1:])
    if argv and argv[0] == "kv":
        from .kv import main as kv_main

        return kv_main(argv[1:])
    if argv and argv[0] == "weights":
        from .weights import main as weights_main

        return weights_main(argv[1:])
    if argv and argv[0] == "allreduce":
        from .allreduce import main as allreduce_main

        return allreduce_main(argv[1:])
    if argv and argv[0] == "model":
        from .model import main as model_main

        return model_main(argv[1:])
    if argv and argv[0] == "moe":
        from .moe import main as moe_main

        return moe_main(argv[1:])
    if argv and argv[0] == "group":
        from .group import main as group_main

        return group_main(argv[1:])
    if argv and argv[0] == "serve":
        sp = CliParser(prog="asyncfabric bench serve")
        sp.add_argument("--listen", required=True, help="HOST:PORT to accept runs on")
        sp.add_argument(
            "--authkey", default=os.environ.get("ASYNCFABRIC_BENCH_KEY", "asyncfabric-bench")
        )
        a = sp.parse_args(argv[1:])
        from .worker import serve_forever

        serve_forever(a.listen, a.authkey.encode())
        return 0
    args = _parser().parse_args(argv)
    try:
        select(args.suites)
        parse_device(args.device)
    except ValueError as exc:
        return _usage_error(str(exc))
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in CORE_IMPLS + INDEPENDENT_IMPLS + PEER_IMPLS]
    if unknown or not impls:
        return _usage_error(
            f"unknown --impls {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(CORE_IMPLS + INDEPENDENT_IMPLS + PEER_IMPLS)}"
        )
    # an unknown provider fails here, alone (BackendUnavailable), before any worker starts
    from .. import Engine

    Engine(args.provider)
    try:
        return asyncio.run(_run(args, argv))
    except WorkerError as exc:
        raise _worker_error(exc) from exc
