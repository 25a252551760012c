"""GPU numbers for the all-reduce (issue 17): CUDA tensors, several processes on one GPU.

    # on the GPU box, with CUDA MPS started (several processes share the GPU):
    python benchmarks/gpu_allreduce.py --out OUT_DIR [--ranks 2,4] [--sizes 8K,...,256M]

Runs ``asyncfabric bench allreduce --device cuda --provider shm`` for each rank
count: gloo ``all_reduce`` on the same CUDA tensors, asyncfabric quant=None
and quant="int8" (bf16), and both fp32 paths, side by side in one run each.
asyncfabric's CUDA path copies the tensor to the host, reduces there and
copies back (docs/collectives.md, "GPU"); this measures that. Writes
OUT_DIR/allreduce_gpu_P<ranks>.json and prints the tables. Without CUDA it
says so and exits 0 (so it can be checked on a CPU machine).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the JSON results")
    p.add_argument("--ranks", default="2,4", help="comma-separated process counts (default 2,4)")
    p.add_argument("--sizes", default="8K,64K,512K,1M,4M,16M,64M,256M")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    try:
        import torch
    except ImportError:
        print("gpu_allreduce: torch is not installed; nothing to measure")
        return 0
    if not torch.cuda.is_available():
        print("gpu_allreduce: no CUDA device here; skipped (run it on the GPU machine)")
        return 0
    from asyncfabric.bench.allreduce import main as bench

    for ranks in [int(r) for r in a.ranks.split(",")]:
        out = os.path.join(a.out, f"allreduce_gpu_P{ranks}.json")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            bench(
                [
                    "--device", "cuda", "--provider", "shm", "--ranks", str(ranks),
                    "--sizes", a.sizes, "--repeats", str(a.repeats), "--json", out,
                ]
            )  # fmt: skip
        print(buf.getvalue())
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
