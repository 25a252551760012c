"""Error of the all-reduce against an exact fp32 sum (docs/collectives.md, "Error").

    python benchmarks/allreduce_accuracy.py [--ranks 2,4] [--n 1048576]

For random normal data and heavy-tailed data (normal times lognormal), each
rank's tensor in bf16: max-abs and relative RMS error of quant="int8" and of
the plain bf16 all-reduce (quant=None: exact fp32 sum rounded once to bf16)
against the exact fp32 sum of the same bf16 inputs. Real groups in one
process (shm), fixed seeds.
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
import torch

from asyncfabric.collectives import all_reduce
from asyncfabric.testing.groups import local_views


def _data(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, generator=g)
    if kind == "heavy-tailed":
        x = x * torch.randn(n, generator=g).exp()
    return x.bfloat16()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--n", type=int, default=1 << 20)
    a = p.parse_args()
    print(f"{'data':<13} {'P':>2} {'path':<10} {'max abs':>10} {'rel RMS':>10}")
    for P in [int(r) for r in a.ranks.split(",")]:
        async with local_views(P, "shm") as views:
            for kind in ("normal", "heavy-tailed"):
                g = torch.Generator().manual_seed(P)
                xs = [_data(kind, a.n, g) for _ in range(P)]
                exact = np.sum([x.float().numpy() for x in xs], axis=0, dtype=np.float32)
                for quant in (None, "int8"):
                    ins = [x.clone() for x in xs]
                    await asyncio.gather(
                        *(all_reduce(ins[i], views[i], quant=quant, timeout=60) for i in range(P))
                    )
                    got = ins[0].float().numpy()
                    err = got - exact
                    rel = np.sqrt(np.mean(err**2) / np.mean(exact**2))
                    name = "bf16" if quant is None else "int8"
                    print(f"{kind:<13} {P:>2} {name:<10} {np.abs(err).max():>10.4g} {rel:>10.3e}")


if __name__ == "__main__":
    asyncio.run(main())
