"""Rank programs the multi-process MoE tests spawn (importable, so spawn can find them)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import torch

from asyncfabric.moe import ExpertParallel, RankLost

H, E, K, T = 32, 6, 2, 16


def _inputs(rank: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank * 10 + layer)
    x = torch.randn(T, H, generator=g)
    idx = torch.rand(T, E, generator=g).argsort(1)[:, :K]
    return x, idx, torch.rand(T, K, generator=g)


async def dies_mid_layer(
    view: Any, victim: int, timeout: float, mode: Any, combine: Any = None
) -> dict[str, Any]:
    """Layer 0 runs on every rank; in layer 1 ``victim`` is SIGKILLed after its dispatch.
    The others report what their layer-1 dispatch/combine raised and how long it took."""
    ep = await ExpertParallel.create(view, num_experts=E, hidden=H, topk=K, max_tokens=T,
                                     dtype=torch.float32, mode=mode, timeout=timeout,
                                     combine=combine)  # fmt: skip
    for layer in range(2):
        x, idx, w = _inputs(view.rank, layer)
        d = await ep.dispatch(x, idx, w)
        if layer == 1 and view.rank == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.monotonic()
        try:
            await ep.combine(d.x.clone())
        except RankLost as e:
            out = {"error": "RankLost", "ranks": list(e.ranks), "after_s": time.monotonic() - t0,
                   "message": str(e)}  # fmt: skip
            await asyncio.sleep(timeout + 1)  # leaving now would make the others blame us
            return out
    return {"error": None}


async def dies_before_layer(view: Any, victim: int, timeout: float) -> dict[str, Any]:
    """``victim`` exits before layer 1's dispatch; the others' dispatch must fail."""
    ep = await ExpertParallel.create(view, num_experts=E, hidden=H, topk=K, max_tokens=T,
                                     dtype=torch.float32, timeout=timeout)  # fmt: skip
    x, idx, w = _inputs(view.rank, 0)
    await ep.combine((await ep.dispatch(x, idx, w)).x.clone())
    if view.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    x, idx, w = _inputs(view.rank, 1)
    t0 = time.monotonic()
    try:
        await ep.dispatch(x, idx, w)
    except RankLost as e:
        out = {"error": "RankLost", "ranks": list(e.ranks), "after_s": time.monotonic() - t0,
               "message": str(e)}  # fmt: skip
        await asyncio.sleep(timeout + 1)
        return out
    return {"error": None}


def gloo_reduced_baseline(rank: int, W: int, port: int, q: Any) -> None:
    """bench moe's gloo-red baseline on tiny shapes; puts, per round, whether its combine
    equals the pre-reduced reference and the top-k order one (identity experts)."""
    import torch.distributed as dist

    from asyncfabric.bench import moe as bm
    from asyncfabric.moe import reference

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=W)  # fmt: skip
    got = []
    combine = bm._gloo_reduced_combine

    def keep(*a: Any) -> Any:
        got.append(combine(*a))
        return got[-1]

    bm._gloo_reduced_combine = keep  # observes the result; the exchange is gloo's own
    a = {"experts": 16, "topk": 5, "hidden": 32, "dtype": "float32", "device": "cpu",
         "warmup": 0, "tokens": 12}  # fmt: skip
    torch.manual_seed(100 + rank)  # the baseline's x is its first draw
    bm._gloo_rounds(rank, W, a, 12, 3, reduced=True)
    torch.manual_seed(100 + rank)
    x = torch.randn(12, 32)
    res = []
    for it, out in enumerate(got):
        idx, w = bm._routing(12, 16, 5, seed=it * 1000 + rank)
        want = reference(x, idx, w, lambda e, r: r, ep=W, num_experts=16)
        top = reference(x, idx, w, lambda e, r: r)
        res.append((torch.equal(out, want), torch.equal(out, top)))
    dist.destroy_process_group()
    q.put((rank, res))
