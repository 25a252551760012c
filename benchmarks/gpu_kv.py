"""KV-cache transfer on a GPU: token-identical decode with CUDA tensors, and the 8B-like
layout timed with both caches in GPU memory.

    nvidia-cuda-mps-control -d            # both processes share one GPU: run them under MPS
    .venv/bin/python benchmarks/gpu_kv.py --out results/gpu_kv
    echo quit | nvidia-cuda-mps-control   # afterwards

1. A Llama-family model (random weights, fixed seed; 3 layers, GQA) on cuda:0 in this process
   (prefill) and in a decode process; the KV moves through asyncfabric (shm; CUDA tensors are
   staged through pinned host memory on shm) into the decode process's paged cache on the
   GPU; decode continues greedily. Checks the tokens equal single-process ``generate()`` on
   the GPU for prompts of 1 to 200 tokens, several not a multiple of the block size.
2. ``asyncfabric bench kv --device cuda``: 32 layers, 8 KV heads, head dim 128, bf16,
   16-token blocks, 1k/4k/16k-token prompts: kv (one post), kv-layers, af-batch (the
   transport alone), and the pipelining rows (a sleep per layer stands in for compute).

Writes ``tokens.json`` and ``bench.json`` under ``--out`` and prints a summary. Without CUDA
it says so and exits 0 (``--cpu`` runs the same steps on CPU, small, to check the script).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import time


def tokens_check(device: str, prompts: list[int], new: int) -> dict:
    import torch

    import asyncfabric as af
    from asyncfabric.kv import KVPrefill
    from asyncfabric.testing import kv_model as km

    model = km.tiny_llama(0, device=device, kv_heads=2)
    ps = [km.np_prompt(i, n) for i, n in enumerate(prompts)]
    want = [km.reference(model, p, new) for p in ps]
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=km.decode_process,
                       args=(there, 0, 512, 16, {"kv_heads": 2}, {}, device))  # fmt: skip
    proc.start()

    async def run() -> list[list[int]]:
        addr = here.recv()
        async with af.Engine("shm") as eng:
            async with KVPrefill(eng, km.layout_for(model, 256, 16), device=device) as pre:
                link = await pre.connect(addr)
                reqs = [await km.prefill(pre, link, model, f"g{i}", p, new)
                        for i, p in enumerate(ps)]  # fmt: skip
                outs = await asyncio.gather(*(r.result(120) for r in reqs))
        return [json.loads(o)["tokens"] for o in outs]

    try:
        t0 = time.monotonic()
        got = asyncio.run(run())
        here.send("stop")
        leaked = here.recv()
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    cases = [{"prompt_len": len(p), "generate": w, "disaggregated": g, "identical": w == g}
             for p, w, g in zip(ps, want, got)]  # fmt: skip
    return {"device": device, "torch": torch.__version__, "cases": cases,
            "all_identical": all(c["identical"] for c in cases), "blocks_leaked": leaked,
            "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for the JSON results")
    ap.add_argument("--cpu", action="store_true", help="run on CPU, small (a smoke check)")
    ap.add_argument("--tokens", default="1024,4096,16384")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import torch

    if args.cpu:
        device, tokens, reps = "cpu", "256,1024", 2
    elif torch.cuda.is_available():
        device, tokens, reps = "cuda", args.tokens, args.reps
    else:
        msg = "no CUDA device here: skipped (run with --cpu for a CPU smoke check)"
        print(f"gpu_kv: {msg}")
        with open(os.path.join(args.out, "skipped.json"), "w") as f:
            json.dump({"skipped": msg}, f)
        return 0
    print(f"gpu_kv: token check on {device} ...", flush=True)
    prompts = [1, 5, 16, 17, 33, 100, 200] if device == "cuda" else [1, 5, 17, 33]
    tok = tokens_check(device, prompts, 8)
    with open(os.path.join(args.out, "tokens.json"), "w") as f:
        json.dump(tok, f, indent=1)
    print(f"  identical to generate(): {tok['all_identical']} "
          f"({len(tok['cases'])} prompts, lengths {prompts}); blocks leaked: "
          f"{tok['blocks_leaked']}", flush=True)  # fmt: skip
    print(f"gpu_kv: bench kv on {device} ...", flush=True)
    from asyncfabric.bench.kv import main as bench_main

    bench_json = os.path.join(args.out, "bench.json")
    small = ["--layers", "4"] if args.cpu else []
    rc = bench_main(["--device", device, "--tokens", tokens, "--reps", str(reps), *small,
                     "--impls", "kv,kv-layers,af-batch", "--pipeline", "--json", bench_json])  # fmt: skip
    return 0 if tok["all_identical"] and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
