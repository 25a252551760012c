"""combine="reduced": each rank sums its share of a token before sending it back.

Against the single-process reference summing in the same documented order (bit for bit),
and against the top-k order reference within fp32 / bf16 rounding, over real engines."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from asyncfabric.moe import ExpertParallel, MoEInputError, reference
from asyncfabric.testing.groups import local_views

from .test_exact import H, expert, routing


def _naive(x, idx, w, place, W):
    """fp64 per-rank shares and their sum, apart from the package's code."""
    T, k = idx.shape
    parts = torch.zeros(W, T, x.shape[1], dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(idx[t, j])
            parts[int(place[e]), t] += float(w[t, j]) * expert(e, x[t : t + 1])[0].double()
    return parts


@pytest.mark.parametrize(
    "world,k,dtype,cdt,quant",
    [(2, 1, torch.float32, torch.float32, None), (2, 8, torch.bfloat16, torch.float32, None),
     (2, 8, torch.bfloat16, torch.bfloat16, None), (4, 2, torch.float32, torch.float32, None),
     (4, 5, torch.bfloat16, torch.float32, None), (4, 8, torch.float32, torch.float32, None),
     (4, 4, torch.bfloat16, torch.float32, "fp8"), (8, 3, torch.float32, torch.float32, None),
     (8, 8, torch.bfloat16, torch.float32, None), (8, 6, torch.bfloat16, torch.bfloat16, None)],
)  # fmt: skip
def test_reduced_matches_references(world, k, dtype, cdt, quant):
    E, T = 16, 24
    place = torch.arange(E) // (E // world)

    async def main():
        async with local_views(world, "shm") as views:
            eps = await asyncio.gather(*(ExpertParallel.create(
                v, num_experts=E, hidden=H, topk=k, max_tokens=T, dtype=dtype, timeout=20,
                combine="reduced", combine_dtype=cdt, quant=quant) for v in views))  # fmt: skip
            differs = False
            for layer in range(3):  # several layers, uneven token counts, one rank idle once
                g = torch.Generator().manual_seed(world * 100 + k * 10 + layer)
                tokens = [T - (r * 5 + layer) % T for r in range(world)]
                if layer == 2:
                    tokens[0] = 0
                inputs = []
                for r in range(world):
                    x = torch.randn(tokens[r], H, generator=g).to(dtype)
                    inputs.append((x, *routing(g, tokens[r], E, k)))

                async def one(r, inputs=inputs):
                    d = await eps[r].dispatch(*inputs[r])
                    outs = [expert(e, rows) for e, rows in zip(d.experts, d.split())]
                    return await eps[r].combine(torch.cat(outs) if outs else d.x[:0])

                got = await asyncio.gather(*(one(r) for r in range(world)))
                for r, (x, idx, w) in enumerate(inputs):
                    want = reference(x, idx, w, expert, quant, ep=world, num_experts=E,
                                     combine_dtype=cdt)  # fmt: skip
                    assert got[r].dtype == dtype
                    assert torch.equal(got[r], want), f"rank {r} layer {layer}"
                    top = reference(x, idx, w, expert, quant)
                    differs |= not torch.equal(want, top)
                    if quant is None:
                        _within_rounding(got[r], top, x, idx, w, place, world, dtype, cdt)
            if k >= 3 and quant is None and (dtype == torch.float32 or cdt == torch.bfloat16):
                # the two orders do differ here, so the bit-for-bit check above means something
                # (with two terms they cannot: (0 + a) + b == a + b)
                assert differs
            for ep in eps:
                await ep.aclose()

    asyncio.run(main())


def _within_rounding(got, top, x, idx, w, place, W, dtype, cdt):
    if not len(x):
        return
    parts = _naive(x, idx, w, place, W)
    exact = parts.sum(0)
    g = got.double()
    # fp32 sums of at most k terms, reassociated: a few fp32 ulps of the terms' magnitude
    mag = (w.double()[:, :, None].abs() * 20).sum(1)
    err = (g - exact).abs()
    if dtype == torch.float32:
        assert bool((err <= 8 * 2.0**-24 * mag + 1e-30).all())
        torch.testing.assert_close(got, top, rtol=1e-5, atol=1e-5)
        return
    ulp = 2.0**-8  # bf16: 8 significant bits, half an ulp is 2^-9 relative
    bound = ulp * exact.abs() + 8 * 2.0**-24 * mag
    if cdt == torch.bfloat16:  # each rank's partial rounded to bf16 once more
        bound = bound + ulp * parts.abs().sum(0)
    assert bool((err <= bound + 1e-30).all()), float((err - bound).max())
    # and the top-k order result is within the same rounding of the same value
    assert bool(((top.double() - exact).abs() <= ulp * exact.abs() + 8 * 2.0**-24 * mag).all())


def test_reduced_order_is_the_documented_one():
    """The reference's order, checked against scalar float32 arithmetic in numpy: per rank
    w*y for the first of its top-k slots, then + w*y slot by slot, then the ranks' partials
    added to 0 in rank order."""
    g = torch.Generator().manual_seed(7)
    T, E, k, W, h = 9, 8, 5, 4, 3
    x = torch.randn(T, h, generator=g)
    idx, w = routing(g, T, E, k)
    want = reference(x, idx, w, expert, ep=W, num_experts=E)
    f = np.float32
    for t in range(T):
        for c in range(h):
            acc = f(0)
            for d in range(W):
                part = None
                for j in range(k):
                    e = int(idx[t, j])
                    if e // (E // W) != d:
                        continue
                    p = f(w[t, j]) * f(expert(e, x[t : t + 1])[0, c])
                    part = p if part is None else f(part + p)
                if part is not None:
                    acc = f(acc + part)
            assert want[t, c].item() == acc, (t, c)
    # an explicit placement (expert -> rank) gives the same as the even split it names
    place = [e // (E // W) for e in range(E)]
    assert torch.equal(reference(x, idx, w, expert, placement=place), want)


def test_reduced_needs_low_latency():
    async def main():
        async with local_views(2, "shm") as views:
            kw = dict(num_experts=4, hidden=8, topk=2, max_tokens=4, dtype=torch.float32)
            with pytest.raises(MoEInputError, match="low_latency"):
                await ExpertParallel.create(views[0], mode="high_throughput", combine="reduced",
                                            **kw)  # fmt: skip
            with pytest.raises(MoEInputError, match="combine_dtype"):
                await ExpertParallel.create(views[0], combine="exact",
                                            combine_dtype=torch.float32, **kw)  # fmt: skip
            with pytest.raises(MoEInputError, match="combine must be"):
                await ExpertParallel.create(views[0], combine="sum", **kw)  # type: ignore[arg-type]

    asyncio.run(main())
