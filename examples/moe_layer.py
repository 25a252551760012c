"""One MoE layer (SwiGLU expert MLPs, a top-2 router) split over 4 processes.

Each process is one expert-parallel rank holding 2 of the 8 experts and routing its own
16 tokens. Tokens go to their experts' ranks with ``dispatch``, the local experts run,
``combine`` brings the weighted outputs back. Every rank then checks its result against
the whole layer run locally (all 8 experts in one process).

    .venv/bin/python examples/moe_layer.py            # shm; --provider tcp also works
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from asyncfabric.moe import ExpertParallel
from asyncfabric.testing.ranks import spawn_views  # processes joined through a real group

HIDDEN, FFN, EXPERTS, TOPK, TOKENS = 64, 128, 8, 2, 16


class ExpertMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(HIDDEN, FFN, bias=False)
        self.w3 = nn.Linear(HIDDEN, FFN, bias=False)
        self.w2 = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class MoELayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(ExpertMLP() for _ in range(EXPERTS))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = self.gate(x).softmax(-1).topk(TOPK, -1)
        return idx, w / w.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The whole layer in this process: the reference."""
        idx, w = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            t, j = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, t, expert(x[t]) * w[t, j, None])
        return out


async def rank_main(view: Any) -> str:
    torch.manual_seed(0)  # the same layer on every rank
    layer = MoELayer()
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(100 + view.rank))
    ep = await ExpertParallel.create(view, num_experts=EXPERTS, hidden=HIDDEN, topk=TOPK,
                                     max_tokens=TOKENS, dtype=torch.float32)  # fmt: skip
    with torch.no_grad():
        idx, w = layer.route(x)
        d = await ep.dispatch(x, idx, w)
        # Only this rank's experts run here.
        y = torch.cat([layer.experts[e](rows) for e, rows in zip(d.experts, d.split())])
        out = await ep.combine(y)
        err = (out - layer(x)).abs().max().item()
    await ep.aclose()
    assert err < 1e-5, f"rank {view.rank}: differs from the local layer by {err}"
    return (f"rank {view.rank}: experts {list(d.experts)}, {sum(d.counts)} rows in "
            f"{d.counts}, max |ep - local| = {err:.1e}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--provider", default="shm")
    p.add_argument("--ranks", type=int, default=4)
    a = p.parse_args()
    # ttl 10 s: a rank busy building its experts on a loaded machine still renews its lease
    for kind, msg in spawn_views(a.ranks, rank_main, provider=a.provider, timeout=120, ttl=10.0):
        if kind != "ok":
            raise SystemExit(f"failed: {msg}")
        print(msg)


if __name__ == "__main__":
    main()
