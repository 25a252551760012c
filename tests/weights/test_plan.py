"""The static plan: resharding arithmetic is bitwise right, bad layouts are refused."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from asyncfabric.weights import (  # noqa: E402
    Layout,
    LayoutError,
    Pieces,
    Replicated,
    Split,
    column,
    plan,
    row,
)

from ._apply import apply  # noqa: E402

H, I, V, NH, NKV, HD = 64, 96, 80, 8, 4, 8  # noqa: E741


def tensors(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embed": (V, H),
        "qkv": ((NH + 2 * NKV) * HD, H),
        "o": (H, NH * HD),
        "gate_up": (2 * I, H),
        "down": (H, I),
        "norm": (H,),
        "bias": (3 * H,),
        "scalar": (),
        "conv": (6, 4, 5),
    }
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}


def tp_rule(name: str, shape: tuple[int, ...]):
    return {
        "embed": column(),
        "qkv": column((NH * HD, NKV * HD, NKV * HD)),
        "o": row(),
        "gate_up": column((I, I)),
        "down": row(),
        "norm": Replicated(),
        "bias": column((H, H, H)),
        "scalar": Replicated(),
        "conv": Split(2),
    }[name]


def fsdp_rule(name: str, shape: tuple[int, ...]):
    return Replicated() if not shape else Split(0)


def references(lay: Layout, full: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for r in range(lay.world):
        b = lay.alloc(r)
        lay.fill(b, r, full)
        out.append(b)
    return out


@pytest.mark.parametrize("tw", [1, 2, 3])
@pytest.mark.parametrize("iw", [1, 2, 4])
@pytest.mark.parametrize("trule", ["fsdp", "tp"])
def test_resharding_is_bitwise(tw, iw, trule):
    full = tensors()
    if trule == "tp" and tw == 3:
        pytest.skip("tensor parallelism over 3 ranks does not divide these sizes")
    tl = Layout.of(full, tw, fsdp_rule if trule == "fsdp" else tp_rule)
    il = Layout.of(full, iw, tp_rule)
    p = plan(tl, il)
    got = apply(p, references(tl, full), tl)
    want = references(il, full)
    for r in range(iw):
        assert torch.equal(got[r], want[r]), f"inference rank {r}"
    # a parameter assembled from the inference shards is the original
    for name in full:
        shards = [il.views(want[r], r)[name] for r in range(iw)]
        assert torch.equal(il.assemble(name, shards), full[name])


def test_cast_is_the_reference_cast():
    full = tensors(1)
    tl = Layout.of(full, 2, fsdp_rule, dtype=torch.float32)
    il = Layout.of(full, 2, tp_rule, dtype=torch.bfloat16)
    p = plan(tl, il, cast=True)
    assert all(not m.direct for m in p.moves)
    got = apply(p, references(tl, full), tl)
    ref = {n: t.to(torch.bfloat16) for n, t in full.items()}
    for r in range(2):
        assert torch.equal(got[r], references(il, ref)[r])


def test_plans_are_cached_and_direct_where_contiguous():
    full = tensors()
    tl = Layout.of(full, 2, fsdp_rule)
    il = Layout.of(full, 2, tp_rule)
    assert plan(tl, il) is plan(Layout.of(full, 2, fsdp_rule), il)
    st = plan(tl, il).stats()
    assert st["bytes"] == sum(il.params[n].numel(r) * 4 for n in full for r in range(2))
    # row-parallel o/down are strided in the trainer's dim-0 shard: packed, the rest direct
    staged = {m.param for m in plan(tl, il).moves if not m.direct}
    assert staged == {"o", "down", "conv"}


def test_missing_parameter_is_named():
    full = tensors()
    tl = Layout.of(full, 2, fsdp_rule)
    il = Layout.of({k: v for k, v in full.items() if k != "down"}, 2, tp_rule)
    with pytest.raises(LayoutError, match="'down'.*missing from the inference"):
        plan(tl, il)
    with pytest.raises(LayoutError, match="'down'.*missing from the trainer"):
        plan(il, tl)


def test_shape_and_dtype_disagreements_are_named():
    full = tensors()
    tl = Layout.of(full, 2, fsdp_rule)
    other = dict(full, o=torch.zeros(H, NH * HD + 2))
    with pytest.raises(LayoutError, match="'o'.*shape"):
        plan(tl, Layout.of(other, 2, fsdp_rule))
    il16 = Layout.of(full, 2, tp_rule, dtype=torch.float16)
    with pytest.raises(LayoutError, match="'embed'.*dtype.*cast=True"):
        plan(tl, il16)
    ints = Layout.of({"x": torch.zeros(4, dtype=torch.int32)}, 1, lambda n, s: Split(0))
    floats = Layout.of({"x": torch.zeros(4)}, 1, lambda n, s: Split(0))
    with pytest.raises(LayoutError, match="'x'.*no cast"):
        plan(ints, floats, cast=True)


@pytest.mark.parametrize(
    "per_rank, what",
    [
        ((((0, 3),), ((4, 8),)), "leaves \\[3, 4\\)"),
        ((((0, 5),), ((4, 8),)), "overlaps"),
        ((((0, 4),), ((4, 7),)), "\\[7, 8\\) belongs to no rank"),
        ((((0, 4),), ((4, 9),)), "outside"),
    ],
)
def test_shard_spec_that_does_not_tile_is_refused(per_rank, what):
    with pytest.raises(LayoutError, match=f"'w'.*{what}"):
        Layout(2, [("w", (8, 2), torch.float32, Pieces(0, per_rank))])


def test_tp_degree_must_divide():
    with pytest.raises(LayoutError, match="'qkv'.*divide over 3"):
        Layout(3, [("qkv", (12, 4), torch.float32, column((4, 4, 4)))])
    with pytest.raises(LayoutError, match="'x'.*fused blocks"):
        Layout(2, [("x", (12, 4), torch.float32, column((4, 4)))])
    with pytest.raises(LayoutError, match="'x'.*dim 2"):
        Layout(2, [("x", (12, 4), torch.float32, Split(2))])


# ---------------------------------------------------------------- fp8 (e4m3, per-tensor scale)

FP8 = torch.float8_e4m3fn
QUANTIZED = ("embed", "qkv", "o", "gate_up", "down", "conv")


def fp8_dtype(name: str, shape: tuple[int, ...]) -> torch.dtype:
    return FP8 if name in QUANTIZED else torch.bfloat16


def fp8_reference(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One process, the full tensors: scale = amax / 448 (fp32), q = (x / scale) -> e4m3."""
    out = {}
    for n, x in full.items():
        if n in QUANTIZED:
            scale = x.abs().max().float() / 448
            out[n] = (x.float() / scale).to(FP8)
            out[n + "_scale"] = scale
        else:
            out[n] = x.to(torch.bfloat16)
    return out


@pytest.mark.parametrize("tw", [1, 2, 3])
@pytest.mark.parametrize("iw", [1, 2, 4])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_fp8_cast_is_the_reference_cast(tw, iw, src_dtype):
    full = tensors(2, src_dtype)
    tl = Layout.of(full, tw, fsdp_rule)
    il = Layout.of(full, iw, tp_rule, dtype=fp8_dtype)
    assert il.fp8 == QUANTIZED
    assert il.params["o_scale"].shape == () and il.params["o_scale"].scale_of == "o"
    p = plan(tl, il, cast=True)
    assert p.fp8 == QUANTIZED
    # each rank's amax of its shard, reduced with a max: what the senders are given
    src = references(tl, full)
    amax = {n: max(float(tl.views(b, r)[n].abs().max()) if tl.views(b, r)[n].numel() else 0.0
                   for r, b in enumerate(src)) for n in QUANTIZED}  # fmt: skip
    scales = {n: torch.tensor(a, dtype=torch.float32) / 448 for n, a in amax.items()}
    got = apply(p, src, tl, scales)
    want = references(il, fp8_reference(full))
    for r in range(iw):
        assert torch.equal(got[r], want[r]), f"inference rank {r}"
    # one scale move per fp8 parameter and inference rank, counted like any write
    sm = [m for m in p.moves if m.scale_of is not None]
    assert len(sm) == len(QUANTIZED) * iw and all(m.nbytes == 4 for m in sm)
    assert all(not m.direct for m in p.moves if m.dst_dtype == FP8)


def test_fp8_refusals_are_named():
    full = tensors()
    tl = Layout.of(full, 2, fsdp_rule)
    il = Layout.of(full, 2, tp_rule, dtype=fp8_dtype)
    with pytest.raises(LayoutError, match="'embed'.*dtype.*cast=True"):
        plan(tl, il)
    with pytest.raises(LayoutError, match="'embed'.*trainer holds it as torch.float8_e4m3fn"):
        plan(Layout.of(full, 2, fsdp_rule, dtype=fp8_dtype), il, cast=True)
    with pytest.raises(LayoutError, match="'x'.*float8_e5m2 is not supported"):
        Layout(1, [("x", (4,), torch.float8_e5m2, Split(0))])
    with pytest.raises(LayoutError, match="'x_scale' appears twice"):
        Layout(1, [("x_scale", (4,), torch.float32, Split(0)), ("x", (4,), FP8, Split(0))])
    # a trainer parameter named like an inference scale is ambiguous
    tx = Layout(1, [("x", (4,), torch.float32, Split(0)), ("x_scale", (), torch.float32,
                                                          Replicated())])  # fmt: skip
    ix = Layout(1, [("x", (4,), FP8, Split(0))])
    with pytest.raises(LayoutError, match="'x_scale'.*scale of.*'x'"):
        plan(tx, ix, cast=True)


@pytest.mark.parametrize("scratch", [None, 7, 64, 1 << 20])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fp8_cast_in_blocks_is_the_reference_cast(scratch, src_dtype):
    from asyncfabric.weights import fp8

    x = (torch.randn(33, 24, generator=torch.Generator().manual_seed(3)) * 5).to(src_dtype)
    x[4, 5] = -x.abs().max() * 1.5  # the amax is a negative value
    sl = x[:, 3:17]  # strided, as a row-parallel slice of a dim-0 shard
    scale = fp8.scale_for(float(fp8.amax(x)))
    assert float(scale) == float(x.abs().max().float() / 448)
    dst = torch.empty(sl.shape, dtype=FP8)
    buf = None if scratch is None else torch.empty(scratch, dtype=torch.float32)
    fp8.quantize_into(dst, sl, scale, buf)
    want = (sl.float() / (x.abs().max().float() / 448)).to(FP8)
    assert torch.equal(dst.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(fp8.scale_for(0.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="finite"):
        fp8.scale_for(float("inf"))
