"""MoE dispatch/combine on the GPU machine: asyncfabric against gloo, EP 2, 4 and 8.

Every rank is a process on the same GPU (cuda:0), so the lead starts CUDA MPS first
(``nvidia-cuda-mps-control -d``). DeepSeek-V3-like shapes: hidden 7168, 256 experts, top-8,
bf16, 128 tokens per rank for decode and 4096 for prefill. Rows are CUDA tensors; on shm
they travel staged through pinned host memory (``docs/gpu.md``). gloo moves host tensors
only, so its rows are copied to the host and back around each all_to_all_single. DeepEP is
not run: it needs NVSHMEM and one GPU per rank (NVLink or an RDMA NIC), not one shared GPU.

    nvidia-cuda-mps-control -d
    .venv/bin/python benchmarks/gpu_moe.py --out /tmp/gpu_moe
    .venv/bin/python benchmarks/gpu_moe.py --out /tmp/x --device cpu --quick   # smoke test
    .venv/bin/python benchmarks/gpu_moe.py --out /tmp/gpu_moe_fp8 --fp8   # + fp8 dispatch

Writes DIR/gpu_moe.json (rows and settings) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for gpu_moe.json")
    p.add_argument("--ep", default="2,4,8")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--provider", default="shm")
    p.add_argument("--quick", action="store_true", help="small shapes, few iterations")
    p.add_argument("--fp8", action="store_true", help="also time fp8 (e4m3) dispatch")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        msg = "gpu_moe: skipped, torch sees no CUDA device here (use --device cpu to smoke-test)"
        print(msg)
        (out / "gpu_moe.json").write_text(json.dumps({"skipped": msg}))
        return 0
    from asyncfabric.bench.moe import run_ep

    settings = dict(
        provider=a.provider, device=a.device, experts=256, hidden=7168, topk=8,
        dtype="bfloat16", tokens=128, prefill_tokens=4096, iters=50, prefill_iters=5,
        warmup=5, capacity_factor=1.5, impls=["ll", "ht", "gloo"], deadline_s=580,
        threads=max(1, (os.cpu_count() or 2) // 8),
    )  # fmt: skip
    if a.fp8:
        settings["impls"] = ["ll", "ll-fp8", "ht", "ht-fp8", "gloo"]
    if a.quick:
        settings.update(experts=16, hidden=256, prefill_tokens=256, iters=5, prefill_iters=2,
                        warmup=1)  # fmt: skip
    rows = []
    t0 = time.monotonic()
    for W in (int(e) for e in a.ep.split(",")):
        rows += run_ep(W, settings)
        print(f"EP{W} done after {time.monotonic() - t0:.0f} s", file=sys.stderr)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    res = {"meta": {"argv": sys.argv, "gpu": gpu, "settings": settings,
                    "elapsed_s": round(time.monotonic() - t0, 1)}, "rows": rows}  # fmt: skip
    (out / "gpu_moe.json").write_text(json.dumps(res, indent=1))
    from asyncfabric.bench.moe import table

    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
