"""fp8 (e4m3) with one fp32 scale per tensor: the format inference layouts may declare.

A parameter ``name`` declared ``torch.float8_e4m3fn`` in an inference layout is sent as
``q = clamp(x.float() / scale, -448, 448).to(float8_e4m3fn)`` with
``scale = amax / 448`` (fp32; 1.0 when ``amax`` is 0), ``amax`` the largest ``|x|`` of the
*full* tensor, and the scale lands beside it as the layout's parameter ``name + "_scale"``
(a 0-dim float32, on every rank; vLLM's name for a weight's scale). Dequantize with
``q.float() * scale``. Every trainer rank casts its own part with the same scale, so the
ranks must agree on ``amax``: the caller reduces :meth:`Sender.local_amax` over them
(see docs/weights.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .layout import Layout
    from .receiver import Receiver

E4M3: torch.dtype | None = getattr(torch, "float8_e4m3fn", None)
"""``torch.float8_e4m3fn`` where this torch has it (>= 2.1), else None."""

E4M3_MAX = 448.0
"""The largest finite e4m3fn value."""

SCALE_SUFFIX = "_scale"


def is_fp8(dtype: torch.dtype) -> bool:
    """Any float8 dtype (only e4m3fn is sent; the others are refused by name)."""
    return "float8" in str(dtype)


def scale_for(amax: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 0-dim fp32 scale of a tensor whose largest ``|x|`` is ``amax``."""
    a = float(amax)
    if not math.isfinite(a) or a < 0:
        raise ValueError(f"amax must be finite and >= 0, got {amax!r}")
    if a == 0:
        return torch.ones((), dtype=torch.float32, device=device)
    return torch.tensor(a, dtype=torch.float32, device=device) / E4M3_MAX


def quantize_into(
    dst: torch.Tensor, src: torch.Tensor, scale: torch.Tensor, scratch: torch.Tensor | None = None
) -> None:
    """``dst`` (float8_e4m3fn) = ``src`` quantized with ``scale`` (0-dim fp32).

    Division in fp32, whatever ``src``'s dtype; the clamp only matters for an ``amax``
    smaller than the tensor's (it saturates instead of giving NaN). ``scratch``: a flat
    fp32 buffer to work in, a block of ``src``'s rows at a time (about 4x faster on CPU
    than fresh temporaries the size of ``src``: no page faults, the block stays in cache)."""
    if scratch is None or src.dim() == 0 or src.numel() == 0:
        dst.copy_(torch.div(src.float(), scale).clamp_(-E4M3_MAX, E4M3_MAX))
        return
    n0 = src.shape[0]
    per = max(1, src[0].numel())
    rows = max(1, scratch.numel() // per)
    for lo in range(0, n0, rows):
        hi = min(n0, lo + rows)
        shape = (hi - lo, *src.shape[1:])
        k = (hi - lo) * per
        t = (
            scratch[:k].view(shape)
            if k <= scratch.numel()
            else src.new_empty(shape, dtype=torch.float32)
        )
        t.copy_(src[lo:hi])
        t.div_(scale).clamp_(-E4M3_MAX, E4M3_MAX)
        dst[lo:hi].copy_(t)


def amax(x: torch.Tensor) -> torch.Tensor:
    """The largest ``|x|`` as a 0-dim fp32 (0 for an empty tensor), in one pass."""
    if not x.numel():
        return torch.zeros((), dtype=torch.float32, device=x.device)
    lo, hi = torch.aminmax(x)
    return torch.maximum(-lo, hi).float()


def reference(layout: Layout, full: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``layout``'s ranks should hold, cast in one process from the full tensors.

    fp8 parameters: ``scale = amax / 448`` of the whole tensor (fp32; 1.0 for an all-zero
    tensor), ``q = (x.float() / scale) -> e4m3``, and ``name + "_scale"`` beside it; every
    other parameter: ``x`` cast to the layout's dtype. Written apart from
    :func:`quantize_into` (one division over the whole tensor, no blocks), so a check
    against it can catch a bug in the sender's cast."""
    out: dict[str, torch.Tensor] = {}
    for n, x in full.items():
        dt = layout.params[n].dtype
        if not is_fp8(dt):
            out[n] = x.to(dt)
            continue
        a = x.abs().max().float()
        scale = a / E4M3_MAX if float(a) else torch.ones((), dtype=torch.float32, device=x.device)
        out[n] = (x.float() / scale).to(dt)
        out[n + SCALE_SUFFIX] = scale
    return out


def shards_equal(
    layout: Layout, receivers: Sequence[Receiver], ref: Mapping[str, torch.Tensor]
) -> list[bool]:
    """Per receiver: is its served buffer bitwise what ``ref`` (full tensors, e.g. from
    :func:`reference`) gives for its rank?"""
    equal = []
    for rx in receivers:
        want = layout.alloc(rx.rank, rx.buffer.device)
        layout.fill(want, rx.rank, ref)
        equal.append(bool(torch.equal(want, rx.buffer)))
    return equal
