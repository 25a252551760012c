"""Bad input raises MoEInputError on the rank that made it, before anything is sent."""

from __future__ import annotations

import asyncio

import pytest
import torch

from asyncfabric.moe import ExpertParallel, MoEError, MoEInputError, RankLost
from asyncfabric.testing.groups import local_views

H, E, K, T = 16, 8, 2, 8


def good(T: int = T):
    g = torch.Generator().manual_seed(0)
    idx = torch.rand(T, E, generator=g).argsort(1)[:, :K]
    return torch.randn(T, H, generator=g), idx, torch.rand(T, K, generator=g)


async def group(n=2, **kw):
    cm = local_views(n, "shm")
    views = await cm.__aenter__()
    args = dict(num_experts=E, hidden=H, topk=K, max_tokens=T, dtype=torch.float32, timeout=2)
    args.update(kw)
    eps = await asyncio.gather(*(ExpertParallel.create(v, **args) for v in views))
    return cm, eps


def test_bad_dispatch_inputs_are_refused_before_sending():
    x, idx, w = good()
    cases = [
        ((x, idx.clone().fill_(E), w), "expert id 8"),
        ((x, idx - 100, w), "outside"),
        ((torch.randn(T + 1, H), torch.zeros(T + 1, K, dtype=torch.long), torch.ones(T + 1, K)),
         "max_tokens"),
        ((torch.randn(T, H + 1), idx, w), "hidden"),
        ((x, idx[:, :1], w), "topk_idx has shape"),
        ((x.to(torch.bfloat16), idx, w), "carries torch.float32"),
        ((x, idx.float(), w), "integer"),
        ((x, torch.zeros(T, K, dtype=torch.long), w), "same expert twice"),
        (("x", idx, w), "tensor"),
    ]  # fmt: skip

    async def main():
        cm, eps = await group()
        try:
            for args, words in cases:
                with pytest.raises(MoEInputError, match=words):
                    await eps[0].dispatch(*args)
            # nothing was sent: rank 1 holds no arrivals, and the group still works
            for ep in eps:
                assert ep.engine.counter(ep._imm(1, 0)).count == 0
            res = await asyncio.gather(*(ep.dispatch(*good()) for ep in eps))
            await asyncio.gather(*(ep.combine(d.x.clone()) for ep, d in zip(eps, res)))
        finally:
            await cm.__aexit__(None, None, None)

    asyncio.run(main())


def test_mismatched_creation_is_named():
    async def main():
        async with local_views(2, "shm") as views:
            base = dict(num_experts=E, topk=K, max_tokens=T, timeout=5)
            res = await asyncio.gather(
                ExpertParallel.create(views[0], hidden=H, **base),
                ExpertParallel.create(views[1], hidden=H * 2, **base),
                return_exceptions=True,
            )
            for r in res:
                assert isinstance(r, MoEInputError) and "same arguments" in str(r), r

    asyncio.run(main())


def test_creation_arguments_checked():
    async def main():
        async with local_views(2, "shm") as views:
            for kw, words in [
                (dict(num_experts=7), "split evenly"),
                (dict(topk=0), "topk"),
                (dict(dtype=torch.int8), "dtype"),
                (dict(mode="fast"), "mode"),
                (dict(slot=256), "slot"),
                (dict(capacity=10), "high_throughput"),
            ]:
                args = dict(num_experts=E, hidden=H, topk=K, max_tokens=T)
                args.update(kw)
                with pytest.raises(MoEInputError, match=words):
                    await ExpertParallel.create(views[0], **args)

    asyncio.run(main())


def test_order_of_calls_is_checked():
    async def main():
        cm, eps = await group()
        try:
            with pytest.raises(MoEError, match="call dispatch first"):
                await eps[0].combine(torch.zeros(0, H))
            res = await asyncio.gather(*(ep.dispatch(*good()) for ep in eps))
            with pytest.raises(MoEError, match="call combine first"):
                await eps[0].dispatch(*good())
            with pytest.raises(MoEInputError, match="expert_out has shape"):
                await eps[0].combine(torch.zeros(res[0].x.shape[0] + 1, H))
            await asyncio.gather(*(ep.combine(d.x.clone()) for ep, d in zip(eps, res)))
        finally:
            await cm.__aexit__(None, None, None)

    asyncio.run(main())


def test_capacity_overflow_raised_on_every_rank_before_rows():
    async def main():
        cm, eps = await group(mode="high_throughput", capacity=4)
        try:
            res = await asyncio.gather(*(ep.dispatch(*good()) for ep in eps),
                                       return_exceptions=True)  # fmt: skip
            for r in res:
                assert isinstance(r, MoEError) and "capacity=4" in str(r), r
        finally:
            await cm.__aexit__(None, None, None)

    asyncio.run(main())


def test_a_silent_rank_times_out_as_rank_lost():
    async def main():
        cm, eps = await group(timeout=0.5)
        try:
            with pytest.raises(RankLost) as ei:
                await eps[0].dispatch(*good())
            assert ei.value.ranks == (1,)
            with pytest.raises(MoEError, match="no longer be used"):
                await eps[0].dispatch(*good())
        finally:
            await cm.__aexit__(None, None, None)

    asyncio.run(main())
