"""Execute a plan's moves in one process, byte for byte (no transport): checks the plan's
arithmetic alone, separately from the runtime that moves the same bytes over a fabric."""

from __future__ import annotations

import torch

from asyncfabric.weights import Layout, Plan


def apply(
    p: Plan,
    src_bufs: list[torch.Tensor],
    trainer: Layout,
    scales: dict[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``scales``: each fp8 parameter's scale (0-dim fp32), as a sender would compute it."""
    inf = p.inference
    out = [inf.alloc(r) for r in range(inf.world)]
    for m in p.moves:
        dst = out[m.dst]
        if m.direct:
            assert m.src_offsets is not None
            for so, do in zip(m.src_offsets.tolist(), m.dst_offsets.tolist()):
                dst[do : do + m.run_bytes] = src_bufs[m.src][so : so + m.run_bytes]
        else:
            if m.scale_of is not None:  # the sender's scale, not its buffer
                assert scales is not None
                view = scales[m.scale_of]
            else:
                view = trainer.views(src_bufs[m.src], m.src)[m.param]
            if m.box:
                view = view[tuple(slice(a, a + n) for a, n in m.box)]
            if m.dst_dtype == torch.float8_e4m3fn:
                assert scales is not None
                view = (view.float() / scales[m.param]).clamp(-448, 448)
            packed = view.to(m.dst_dtype).contiguous().view(-1).view(torch.uint8)
            for k, do in enumerate(m.dst_offsets.tolist()):
                dst[do : do + m.run_bytes] = packed[k * m.run_bytes : (k + 1) * m.run_bytes]
    return out
