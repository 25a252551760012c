"""fp8 dispatch (e4m3, one fp32 scale per token): combine(expert(dispatch(x))) equals the
single-process reference that rounds each token the same way, over real engines."""

from __future__ import annotations

import asyncio

import pytest
import torch

from asyncfabric.moe import ExpertParallel, MoEInputError, fp8, reference
from asyncfabric.testing.groups import local_views

from .test_exact import expert, routing

H = 60  # not a multiple of 4: the scale sits after padding
FP8 = torch.float8_e4m3fn


def roundtrip(x: torch.Tensor) -> torch.Tensor:
    """Per token: scale = amax / 448 in fp32 (1 for a zero row), q = (x / scale) -> e4m3,
    back = q * scale, in x's dtype. Written here, apart from the package's code."""
    amax = x.abs().amax(1).float() if len(x) else torch.zeros(0)
    s = torch.where(amax > 0, amax / 448, torch.ones_like(amax))[:, None]
    return ((x.float() / s).to(FP8).float() * s).to(x.dtype)


async def _round(eps, dtype, tokens, E, k, seed, errors):
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for T in tokens:
        x = (torch.randn(T, H, generator=g) * torch.rand(T, 1, generator=g) * 10).to(dtype)
        if T:
            x[T // 2] = 0  # an all-zero token: scale 1
        inputs.append((x, *routing(g, T, E, k)))

    async def one(r):
        x, idx, w = inputs[r]
        d = await eps[r].dispatch(x, idx, w)
        assert d.x.dtype == dtype and d.q is not None and d.scales is not None
        assert d.q.dtype == FP8 and d.scales.shape == (d.x.shape[0],)
        assert torch.equal((d.q.float() * d.scales[:, None]).to(dtype), d.x)
        outs = [expert(e, rows) for e, rows in zip(d.experts, d.split())]
        return await eps[r].combine(torch.cat(outs) if outs else d.x[:0])

    got = await asyncio.gather(*(one(r) for r in range(len(eps))))
    for r, (x, idx, w) in enumerate(inputs):
        want = reference(roundtrip(x), idx, w, expert)
        assert torch.equal(got[r], want), f"rank {r}"
        assert torch.equal(reference(x, idx, w, expert, quant="fp8"), want)
        exact = reference(x, idx, w, expert)
        if len(x):
            errors.append(float((got[r].float() - exact.float()).norm() / exact.float().norm()))


@pytest.mark.parametrize("mode", ["low_latency", "high_throughput"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_dispatch_matches_reference(world, dtype, mode):
    E, T = 16, 24

    async def main():
        errors: list[float] = []
        async with local_views(world, "shm") as views:
            for k in range(1, 9):
                eps = await asyncio.gather(*(ExpertParallel.create(
                    v, num_experts=E, hidden=H, topk=k, max_tokens=T, dtype=dtype, mode=mode,
                    timeout=20, quant="fp8", slot=k) for v in views))  # fmt: skip
                assert eps[0].dispatch_row_bytes == 60 + 4  # e4m3 row, fp32 scale
                for layer in range(2):
                    tokens = [T - (r * 5 + layer + k) % T for r in range(world)]
                    if layer == 1:
                        tokens[-1] = 0
                    await _round(eps, dtype, tokens, E, k, world * 100 + k * 10 + layer, errors)
                for ep in eps:
                    await ep.aclose()
        # e4m3 keeps 3 mantissa bits: relative error per element at most 2^-4
        assert 0 < max(errors) < 2**-4

    asyncio.run(main())


def test_fp8_dispatch_over_tcp():
    async def main():
        errors: list[float] = []
        async with local_views(2, "tcp", node="127.0.0.1") as views:
            eps = await asyncio.gather(*(ExpertParallel.create(
                v, num_experts=8, hidden=H, topk=3, max_tokens=16, timeout=20, quant="fp8")
                for v in views))  # fmt: skip
            await _round(eps, torch.bfloat16, [16, 9], 8, 3, 5, errors)
            for ep in eps:
                await ep.aclose()

    asyncio.run(main())


def test_fp8_ranks_must_agree_and_quant_is_checked():
    with pytest.raises(MoEInputError, match="quant must be None or one of"):
        reference(torch.zeros(1, 4), torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1),
                  expert, quant="int8")  # type: ignore[arg-type]  # fmt: skip

    async def main():
        async with local_views(2, "shm") as views:
            with pytest.raises(MoEInputError, match="quant must be None or one of"):
                await ExpertParallel.create(views[0], num_experts=4, hidden=8, topk=1,
                                            max_tokens=2, quant="fp4")  # fmt: skip
            args = dict(num_experts=4, hidden=8, topk=1, max_tokens=2, timeout=5)
            res = await asyncio.gather(
                ExpertParallel.create(views[0], quant="fp8", **args),
                ExpertParallel.create(views[1], **args),
                return_exceptions=True,
            )
            assert all(isinstance(e, MoEInputError) and "'quant'" in str(e) for e in res), res

    asyncio.run(main())


def test_wire_rows():
    assert fp8.row_bytes(60) == 64 and fp8.row_bytes(64) == 68 and fp8.row_bytes(1) == 8
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [448.0, 1e-3, -3.0]])
    assert torch.equal(fp8.scales(x), torch.tensor([2 / 448, 1.0, 1.0]))
    assert torch.equal(fp8.roundtrip(x), roundtrip(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rows_in_several_blocks(dtype):
    # 4096-wide rows: 64 rows a block, so 200 tokens take four blocks each way
    x = (torch.randn(200, 4096, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    x[7] = 0
    assert fp8.block_rows(4096) == 64
    wire = torch.empty(200, fp8.row_bytes(4096), dtype=torch.uint8)
    fp8.quantize_rows(x, wire)
    out = torch.empty_like(x)
    q, s = fp8.dequantize_rows(wire, 4096, out)
    assert torch.equal(out, roundtrip(x))
    assert torch.equal((q.float() * s[:, None]).to(dtype), out) and float(s[7]) == 1.0
