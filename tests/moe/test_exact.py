"""combine(expert(dispatch(x))) equals the single-process reference, over real engines."""

from __future__ import annotations

import asyncio

import pytest
import torch

from asyncfabric.moe import ExpertParallel, reference
from asyncfabric.testing.groups import local_views

H = 64


def scale(e: int) -> float:
    return 1.0 + e / 8


def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
    # Row-wise and exact in any batch composition, so fp32 can be compared bit for bit.
    return rows * scale(e) - e


def routing(g: torch.Generator, T: int, E: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.rand(T, E, generator=g).argsort(1)[:, :k]
    w = torch.rand(T, k, generator=g)
    return idx, w / w.sum(1, keepdim=True)


async def _round(views, eps, dtype, tokens, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for r in range(len(views)):
        T = tokens[r]
        x = torch.randn(T, H, generator=g).to(dtype)
        idx, w = routing(g, T, E, k)
        inputs.append((x, idx, w))

    async def one(r):
        ep = eps[r]
        x, idx, w = inputs[r]
        d = await ep.dispatch(x, idx, w)
        assert sum(d.counts) == d.x.shape[0]
        outs = [expert(e, rows) for e, rows in zip(d.experts, d.split())]
        y = torch.cat(outs) if outs else d.x[:0]
        return await ep.combine(y)

    got = await asyncio.gather(*(one(r) for r in range(len(views))))
    for r, (x, idx, w) in enumerate(inputs):
        want = reference(x, idx, w, expert)
        # and independently of the package's own reduction: a plain loop in fp64
        naive = sum(w[:, j, None].double() * torch.stack([expert(int(e), x[t : t + 1])[0]
                    for t, e in enumerate(idx[:, j])]).double() if len(x) else x.double()
                    for j in range(k))  # fmt: skip
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got[r].double(), naive, rtol=tol, atol=tol)
        if dtype == torch.float32:
            assert torch.equal(got[r], want), f"rank {r}"
        else:
            torch.testing.assert_close(got[r], want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["low_latency", "high_throughput"])
@pytest.mark.parametrize(
    "world,k,dtype",
    [(2, 1, torch.float32), (2, 8, torch.bfloat16), (4, 2, torch.float32), (4, 8, torch.float32),
     (4, 4, torch.float16), (8, 3, torch.float32), (8, 8, torch.bfloat16)],
)  # fmt: skip
def test_matches_reference(world, k, dtype, mode):
    E, T = 16, 24

    async def main():
        async with local_views(world, "shm") as views:
            eps = await asyncio.gather(*(ExpertParallel.create(
                v, num_experts=E, hidden=H, topk=k, max_tokens=T, dtype=dtype, mode=mode,
                combine="exact", timeout=20) for v in views))  # fmt: skip
            # Several layers through one group; uneven token counts, one rank idle once.
            for layer in range(3):
                tokens = [T - (r * 5 + layer) % T for r in range(world)]
                if layer == 2:
                    tokens[0] = 0
                await _round(views, eps, dtype, tokens, E, k, seed=world * 100 + k * 10 + layer)
            for ep in eps:
                await ep.aclose()

    asyncio.run(main())
