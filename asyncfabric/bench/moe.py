"""``asyncfabric bench moe``: MoE dispatch/combine latency, asyncfabric against gloo.

Spawns one process per EP rank. In the same processes, one after the other, it times
asyncfabric's low-latency and high-throughput modes and ``torch.distributed`` with gloo
doing the same exchange (``all_to_all_single`` of the counts, then of the rows, then of the
outputs back), each with the same packing and weighted sum around it. Latency is from the
call to its return on each rank; p50/p99 pool every rank's iterations.

asyncfabric bench moe --ep 2,4 --json moe.json
asyncfabric bench moe --ep 2 --tokens 128 --prefill-tokens 4096 --hidden 7168
asyncfabric bench moe --ep 2 --impls ll,ll-fp8 --prefill-tokens 0   # fp8 dispatch vs bf16
asyncfabric bench moe --ep 2,4 --impls ll-exact,ll-red,gloo,gloo-red --prefill-tokens 0
    # combine="exact" against "reduced" (pre-reduced partials), and gloo doing each
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any


def _routing(T: int, E: int, k: int, seed: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(T, E, generator=g).topk(k, 1).indices
    w = torch.rand(T, k, generator=g).softmax(1)
    return idx, w


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _af_rounds(
    view: Any,
    a: dict[str, Any],
    mode: Any,
    T: int,
    iters: int,
    quant: Any = None,
    combine: Any = None,
    combine_dtype: str | None = None,
) -> dict[str, list[float]]:
    import torch

    from ..moe import ExpertParallel

    dt = getattr(torch, a["dtype"])
    cap = None if mode == "low_latency" else int(T * a["topk"] * a["capacity_factor"])
    ep = await ExpertParallel.create(
        view, num_experts=a["experts"], hidden=a["hidden"], topk=a["topk"], max_tokens=T,
        dtype=dt, mode=mode, capacity=cap, device=a["device"], timeout=120.0, quant=quant,
        combine=combine, combine_dtype=getattr(torch, combine_dtype) if combine_dtype else None,
    )  # fmt: skip
    x = torch.randn(T, a["hidden"], device=a["device"]).to(dt)
    out: dict[str, list[float]] = {"dispatch": [], "combine": [], "step": [], "dispatch_x": [],
                                   "combine_x": [], "step_x": []}  # fmt: skip
    warm = a["warmup"] if a["tokens"] == T else min(1, a["warmup"])
    try:
        for it in range(iters + warm):
            idx, w = _routing(T, a["experts"], a["topk"], seed=it * 1000 + view.rank)
            idx, w = idx.to(a["device"]), w.to(a["device"])
            await view.barrier()  # start together, as gloo's rounds do (dist.barrier)
            t0 = time.perf_counter()
            d = await ep.dispatch(x, idx, w)
            dx = ep.last_exchange_s
            _sync(a["device"])
            t1 = time.perf_counter()
            y = d.x  # identity experts: the exchange alone is timed
            t2 = time.perf_counter()
            await ep.combine(y)
            _sync(a["device"])
            t3 = time.perf_counter()
            if it >= warm:
                _record(out, t0, t1, t2, t3, dx, ep.last_exchange_s)
    finally:
        await ep.aclose()
        del ep
    return out


def _record(
    out: dict[str, list[float]], t0: float, t1: float, t2: float, t3: float, dx: float, cx: float
) -> None:
    """One timed iteration, in µs: the phases (dispatch t0-t1, combine t2-t3, the step)
    and their exchanges alone (dx, cx)."""
    for key, v in (("dispatch", t1 - t0), ("combine", t3 - t2), ("step", t3 - t0),
                   ("dispatch_x", dx), ("combine_x", cx), ("step_x", dx + cx)):  # fmt: skip
        out[key].append(v * 1e6)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _gloo_rounds(
    rank: int, W: int, a: dict[str, Any], T: int, iters: int, reduced: bool = False
) -> dict[str, list[float]]:
    """What users run today: counts with all_to_all_single, then rows, then outputs back.

    ``reduced``: the pre-reduced exchange asyncfabric's ``combine="reduced"`` does, over
    gloo: dispatch also sends each row's flat index and router weight (one more
    all_to_all_single, float64 pairs), the expert side sums each token's rows with the
    same torch ops (``layout.reduce_rows``), one fp32 partial per (token, rank) goes back,
    and the source sums them in rank order."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from ..moe.layout import partial_tokens, reduce_rows, reduction, weighted_sum

    E, k, H = a["experts"], a["topk"], a["hidden"]
    El = E // W
    dt = getattr(torch, a["dtype"])
    dev = torch.device(a["device"])
    # gloo moves host tensors only: on a GPU the rows are copied to and from the host around
    # each all_to_all_single, as users of gloo do.
    host = dev.type != "cpu"
    x = torch.randn(T, H, device=dev).to(dt)
    out: dict[str, list[float]] = {"dispatch": [], "combine": [], "step": [], "dispatch_x": [],
                                   "combine_x": [], "step_x": []}  # fmt: skip
    warm = a["warmup"] if a["tokens"] == T else min(1, a["warmup"])
    for it in range(iters + warm):
        idx, w = _routing(T, E, k, seed=it * 1000 + rank)
        idx, w = idx.to(dev), w.to(dev)
        dist.barrier()
        t0 = time.perf_counter()
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E).cpu()
        send = x.index_select(0, order // k)
        if host:
            send = send.cpu()
        recv_counts = torch.empty_like(counts)
        x0 = time.perf_counter()
        dist.all_to_all_single(recv_counts, counts)  # [W*El]: from each source, per my expert
        in_split = counts.view(W, El).sum(1).tolist()
        out_split = recv_counts.view(W, El).sum(1).tolist()
        recv = torch.empty(sum(out_split), H, dtype=dt)
        dist.all_to_all_single(recv, send, out_split, in_split)
        if reduced:  # each row's flat index and weight, exact in float64
            fw = torch.stack([order.double(), w.reshape(-1)[order].double()], 1).cpu()
            rfw = torch.empty(sum(out_split), 2, dtype=torch.float64)
            dist.all_to_all_single(rfw, fw, out_split, in_split)
        dx = time.perf_counter() - x0
        # group by local expert, as asyncfabric's dispatch returns them (same torch ops as
        # asyncfabric's, gathers with precomputed permutations, so only the exchange differs)
        em_to_sm, sm_to_em = _expert_major(recv_counts.view(W, El))
        expert_in = recv.to(dev).index_select(0, em_to_sm.to(dev))
        _sync(a["device"])
        t1 = time.perf_counter()
        y = expert_in
        t2 = time.perf_counter()
        if reduced:
            _gloo_reduced_combine(y, rfw, sm_to_em, order, out_split, in_split, T, k, W, host,
                                  np, torch, dist, partial_tokens, reduce_rows, reduction)  # fmt: skip
            _sync(a["device"])
            t3 = time.perf_counter()
            if it >= warm:
                _record(out, t0, t1, t2, t3, dx, _GLOO_X[0])
            continue
        back_send = y.index_select(0, sm_to_em.to(dev))
        if host:
            back_send = back_send.cpu()
        back = torch.empty(T * k, H, dtype=dt)
        x0 = time.perf_counter()
        dist.all_to_all_single(back, back_send, in_split, out_split)
        cx = time.perf_counter() - x0
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=dev)
        weighted_sum(back.to(dev).index_select(0, inv).view(T, k, H), w)
        _sync(a["device"])
        t3 = time.perf_counter()
        if it >= warm:
            _record(out, t0, t1, t2, t3, dx, cx)
    return out


_GLOO_X = [0.0]  # the reduced combine's exchange time, seconds


def _gloo_reduced_combine(
    y: Any, rfw: Any, sm_to_em: Any, order: Any, out_split: list[int], in_split: list[int],
    T: int, k: int, W: int, host: bool, np: Any, torch: Any, dist: Any, partial_tokens: Any,
    reduce_rows: Any, reduction: Any,
) -> Any:  # fmt: skip
    dev, H = y.device, y.shape[1]
    flat = rfw[:, 0].long().numpy()
    wts = rfw[:, 1].float().numpy()
    em = sm_to_em.numpy()
    back_rows = []
    sends = []
    o = 0
    tmp = torch.empty(max(1, (2 << 20) // (4 * H)), H, dtype=torch.float32, device=dev)
    rows = torch.empty(tmp.shape[0], H, dtype=y.dtype, device=dev)
    for s in range(W):  # partials for each source, in partial order
        n = out_split[s]
        red = reduction(flat[o : o + n], wts[o : o + n], em[o : o + n], k)
        m = red.prefix[0] if red.prefix else 0
        part = torch.empty(m, H, dtype=torch.float32, device=dev)
        if m:
            if dev.type != "cpu":
                red = type(red)(red.prefix, red.rows.to(dev), red.weights.to(dev))
            reduce_rows(y, red, part, tmp[:0], tmp, rows)
        sends.append(part)
        o += n
    send = torch.cat(sends)
    if host:
        send = send.cpu()
    ordn = order.cpu().numpy()
    toks, p = [], 0
    for d in range(W):
        toks.append(partial_tokens(ordn[p : p + in_split[d]], k)[0])
        p += in_split[d]
        back_rows.append(toks[d].size)
    back = torch.empty(sum(back_rows), H, dtype=torch.float32)
    x0 = time.perf_counter()
    dist.all_to_all_single(back, send, back_rows, [x.shape[0] for x in sends])
    _GLOO_X[0] = time.perf_counter() - x0
    back = back.to(dev)
    acc = torch.zeros(T, H, dtype=torch.float32, device=dev)
    p = 0
    for d in range(W):
        if back_rows[d]:
            acc.index_add_(0, torch.from_numpy(toks[d]).to(dev), back[p : p + back_rows[d]])
        p += back_rows[d]
    return acc.to(y.dtype)


def _expert_major(C: Any) -> tuple[Any, Any]:
    """Source-major rows (as all_to_all_single delivers them) to expert-major and back."""
    import torch

    W, El = C.shape
    src_off = torch.cumsum(C.sum(1), 0) - C.sum(1)
    within = torch.cumsum(C, 1) - C
    lengths = C.t().reshape(-1)
    n = int(lengths.sum())
    step = torch.arange(n) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    em_to_sm = torch.repeat_interleave((src_off[:, None] + within).t().reshape(-1), lengths) + step
    sm_to_em = torch.empty_like(em_to_sm)
    sm_to_em[em_to_sm] = torch.arange(n)
    return em_to_sm, sm_to_em


async def _rank_main(view: Any, a: dict[str, Any]) -> dict[str, Any]:
    if a.get("threads"):
        import torch

        torch.set_num_threads(a["threads"])
    res: dict[str, Any] = {}
    T, P = a["tokens"], a["prefill_tokens"]
    if "ll" in a["impls"]:
        res["asyncfabric-ll/decode"] = await _af_rounds(view, a, "low_latency", T, a["iters"])
    for impl, comb, cdt in (("ll-exact", "exact", None), ("ll-red", "reduced", None),
                            ("ll-red-bf16", "reduced", "bfloat16")):  # fmt: skip
        if impl in a["impls"]:
            res[f"asyncfabric-{impl}/decode"] = await _af_rounds(
                view, a, "low_latency", T, a["iters"], None, comb, cdt
            )
    if "ht" in a["impls"]:
        res["asyncfabric-ht/decode"] = await _af_rounds(view, a, "high_throughput", T, a["iters"])
        if P:
            res["asyncfabric-ht/prefill"] = await _af_rounds(
                view, a, "high_throughput", P, a["prefill_iters"]
            )
    if "ll-fp8" in a["impls"]:
        res["asyncfabric-ll-fp8/decode"] = await _af_rounds(
            view, a, "low_latency", T, a["iters"], "fp8"
        )
    if "ht-fp8" in a["impls"]:
        res["asyncfabric-ht-fp8/decode"] = await _af_rounds(
            view, a, "high_throughput", T, a["iters"], "fp8"
        )
        if P:
            res["asyncfabric-ht-fp8/prefill"] = await _af_rounds(
                view, a, "high_throughput", P, a["prefill_iters"], "fp8"
            )
    await view.barrier(timeout=120)
    if "gloo" in a["impls"] or "gloo-red" in a["impls"]:
        import torch.distributed as dist

        rank, W = view.rank, view.size
        dist.init_process_group("gloo", init_method=a["gloo_url"], rank=rank, world_size=W)
        try:
            if "gloo" in a["impls"]:
                res["gloo/decode"] = _gloo_rounds(rank, W, a, T, a["iters"])
            if "gloo-red" in a["impls"]:
                res["gloo-red/decode"] = _gloo_rounds(rank, W, a, T, a["iters"], reduced=True)
            if P and "gloo" in a["impls"]:
                res["gloo/prefill"] = _gloo_rounds(rank, W, a, P, a["prefill_iters"])
        finally:
            dist.destroy_process_group()
    return res


def run_ep(W: int, a: dict[str, Any]) -> list[dict[str, Any]]:
    from ..testing.ranks import spawn_views

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        a = dict(a, gloo_url=f"tcp://127.0.0.1:{s.getsockname()[1]}")
    results = []
    # ttl: prefill packing holds the event loop for seconds, and lease renewals wait on it
    for kind, val in spawn_views(W, _rank_main, (a,), provider=a["provider"], ttl=60,
                                 timeout=a["deadline_s"]):  # fmt: skip
        if kind != "ok":
            raise RuntimeError(f"EP{W}: {val}")
        results.append(val)
    rows = []
    for key in results[0]:
        impl, phase = key.split("/")
        tokens = a["tokens"] if phase == "decode" else a["prefill_tokens"]
        for op in ("dispatch", "combine", "step"):
            xs = [v for r in results for v in r[key][op]]
            xx = [v for r in results for v in r[key][op + "_x"]]
            rows.append({"ep": W, "impl": impl, "phase": phase, "op": op, "tokens": tokens,
                         "p50_us": _pct(xs, 0.5), "p99_us": _pct(xs, 0.99), "samples": len(xs),
                         "exchange_p50_us": _pct(xx, 0.5)})  # fmt: skip
    for r in rows:
        base = [g for g in rows if g["impl"] == "gloo" and g["phase"] == r["phase"]
                and g["op"] == r["op"]]  # fmt: skip
        r["speedup_vs_gloo_p50"] = base[0]["p50_us"] / r["p50_us"] if base else None
        r["speedup_vs_gloo_p99"] = base[0]["p99_us"] / r["p99_us"] if base else None
        r["exchange_speedup_vs_gloo_p50"] = (
            base[0]["exchange_p50_us"] / r["exchange_p50_us"] if base else None
        )
    return rows


IMPLS = ("ll", "ll-exact", "ll-red", "ll-red-bf16", "ht", "gloo", "gloo-red", "ll-fp8", "ht-fp8")


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as text: latency p50/p99, the exchange's own p50, speed-ups over gloo."""
    lines = [f"{'EP':>3} {'impl':23} {'phase':8} {'op':9} {'tokens':>6} {'p50 us':>10} "
             f"{'p99 us':>10} {'xchg p50':>10} {'gloo/x':>7} {'p99':>5} {'xchg gloo/x':>11}"]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r['ep']:>3} {r['impl']:23} {r['phase']:8} {r['op']:9} {r['tokens']:>6} "
            f"{r['p50_us']:>10.1f} {r['p99_us']:>10.1f} {r['exchange_p50_us']:>10.1f} "
            f"{r['speedup_vs_gloo_p50'] or 0:>7.2f} {r['speedup_vs_gloo_p99'] or 0:>5.2f} "
            f"{r['exchange_speedup_vs_gloo_p50'] or 0:>11.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .._cli import CliParser

    p = CliParser(prog="asyncfabric bench moe", description=__doc__.splitlines()[0])
    p.add_argument("--ep", default="2,4", help="EP sizes (processes), e.g. 2,4,8")
    p.add_argument("--provider", default="shm")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (every rank on cuda:0)")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, default=128, help="decode tokens per rank")
    p.add_argument("--prefill-tokens", type=int, default=4096, help="0 skips prefill")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--prefill-iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--capacity-factor", type=float, default=1.5,
                   help="high-throughput receive capacity, in multiples of tokens*topk")  # fmt: skip
    p.add_argument("--impls", default="ll,ht,gloo",
                   help="comma-separated: ll (default combine), ll-exact, ll-red (pre-reduced "
                   "combine, fp32 partials), ll-red-bf16, ht, gloo, gloo-red (gloo with the "
                   "pre-reduced exchange), and ll-fp8,ht-fp8 (fp8 dispatch)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--deadline-s", type=float, default=600)
    p.add_argument("--json", help="write rows and the settings here")
    args = p.parse_args(argv)
    a = {k: v for k, v in vars(args).items() if k not in ("ep", "json")}
    a["impls"] = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = set(a["impls"]) - set(IMPLS)
    if bad:
        p.error(f"unknown --impls {sorted(bad)}; choose from {', '.join(IMPLS)}")
    eps = [int(e) for e in args.ep.split(",")]
    for W in eps:
        if args.experts % W:
            p.error(f"--experts {args.experts} does not split over EP {W}")
    rows = []
    t0 = time.monotonic()
    for W in eps:
        rows += run_ep(W, a)
    print(table(rows))
    info = {"argv": ["asyncfabric", "bench", "moe", *(argv or sys.argv[1:])], "settings": a,
            "elapsed_s": round(time.monotonic() - t0, 1), "cpus": os.cpu_count()}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": info, "rows": rows}, f, indent=1)
    print(f"done in {info['elapsed_s']} s")
    return 0
