"""GPU run of the RL weight update (issue 15): CUDA tensors on one GPU, processes under MPS.

    nvidia-cuda-mps-control -d        # the lead starts MPS: several processes share GPU 0
    .venv/bin/python benchmarks/gpu_weights.py --out /tmp/gpu-weights
    .venv/bin/python benchmarks/gpu_weights.py --out DIR --provider shm --sizes 0.5,2

1. Bitwise, in this process: a Phi-3 model built from a config (random init, fixed seed) on
   the GPU, trainer 2 ranks (dim 0) to inference tensor parallel 2 and 4, bf16, and fp32 ->
   bf16 with a cast; every inference shard is compared with the reference shard, and the
   model assembled from the shards must give the trainer model's logits; and bf16 -> fp8
   (e4m3, per-tensor scales, the linear weights) against the one-process cast on the same
   GPU, scales included. -> bitwise.json
2. GB/s: ``asyncfabric bench weights --device cuda`` (four processes on GPU 0: two trainer
   ranks, two inference ranks) for each size, asyncfabric vs write_many vs the naive loop
   (gloo is left out: it broadcasts host tensors). -> bench-<size>.json; then with
   ``--fp8`` (asyncfabric vs write_many). -> bench-<size>-fp8.json

Without a GPU it says so and exits 0 (so it can be checked for crashes anywhere);
``--cpu`` runs the same steps on CPU tensors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import asyncfabric as af
from asyncfabric.weights import Layout, Receiver, Sender, Split
from asyncfabric.weights import fp8 as fp8mod
from asyncfabric.weights.rules import megatron_fused


def _cfg(hidden: int = 256, layers: int = 2) -> Any:
    from transformers import Phi3Config

    return Phi3Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, intermediate_size=2 * hidden, vocab_size=1024,
        max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


async def bitwise_case(provider: str, device: str, iw: int, tdtype: Any, idtype: Any) -> dict:
    """``idtype`` float8_e4m3fn: the linear weights in fp8, the rest bf16."""
    from transformers import Phi3ForCausalLM

    cfg = _cfg()
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg).to(device=device, dtype=tdtype).eval()
    full = {n: p.detach() for n, p in model.named_parameters()}
    cast = tdtype != idtype
    fp8 = idtype == torch.float8_e4m3fn
    tl = Layout.of(full, 2, lambda n, s: Split(0))
    il = Layout.of(full, iw, megatron_fused(cfg), dtype=lambda n, s: idtype if not fp8 or
                   n.endswith("proj.weight") else torch.bfloat16)  # fmt: skip
    async with contextlib.AsyncExitStack() as st:
        teng = [await st.enter_async_context(af.Engine(provider)) for _ in range(2)]
        reng = [await st.enter_async_context(af.Engine(provider)) for _ in range(iw)]
        bufs = [tl.alloc(r, device) for r in range(2)]
        for r in range(2):
            tl.fill(bufs[r], r, full)
        txs = [Sender(e, tl, r, bufs[r], cast=cast, bucket_bytes=1 << 20) for r, e in
               enumerate(teng)]  # fmt: skip
        rxs = [Receiver(e, il, r, tl, index=r, cast=cast, device=device) for r, e in
               enumerate(reng)]  # fmt: skip
        for rx in rxs:
            await rx.start([t.info for t in txs])
        t0 = time.perf_counter()
        names = il.fp8
        amax = torch.stack([t.local_amax(names) for t in txs]).amax(0).tolist() if fp8 else []
        amax_d = dict(zip(names, amax)) if fp8 else None
        await asyncio.gather(*(t.update(1, [rx.info for rx in rxs], amax=amax_d) for t in txs),
                             *(rx.wait_version(1, timeout=60) for rx in rxs))  # fmt: skip
        dt = time.perf_counter() - t0
        equal = fp8mod.shards_equal(il, rxs, fp8mod.reference(il, full))
        same: bool | None = None  # fp8: the shards and scales are the check
        if not fp8:
            inf = Phi3ForCausalLM(cfg).to(device=device, dtype=idtype).eval()
            inf.load_state_dict({n: il.assemble(n, [rx.params()[n] for rx in rxs])
                                 for n in il.params})  # fmt: skip
            ids = torch.randint(3, cfg.vocab_size, (2, 16),
                                generator=torch.Generator().manual_seed(7)).to(device)  # fmt: skip
            with torch.no_grad():
                same = bool(torch.equal(inf(input_ids=ids).logits,
                                        model.to(idtype)(input_ids=ids).logits))  # fmt: skip
        for x in (*txs, *rxs):
            x.close()
    return {"inference_tp": iw, "trainer_dtype": str(tdtype), "inference_dtype": str(idtype),
            "shards_bitwise_equal": equal, "logits_equal": same, "update_s": dt,
            "provider": provider, "device": device}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for the JSON results")
    ap.add_argument(
        "--provider",
        default="auto",
        help="auto: cuda_ipc where it opens, else shm (staged through host)",
    )
    ap.add_argument("--sizes", default="0.5,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="run on CPU tensors (a smoke test)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.cpu:
        device = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_weights: no CUDA GPU here; nothing run (use --cpu for a smoke test)")
        return 0
    else:
        device = "cuda:0"
    provider = a.provider
    if provider == "auto":
        provider = "shm"
        if device != "cpu":
            try:
                asyncio.run(_opens("cuda_ipc"))
                provider = "cuda_ipc"
            except Exception as exc:  # noqa: BLE001 - reported, then shm is used
                print(f"gpu_weights: cuda_ipc does not open here ({exc}); using shm")
    results = []
    for iw, td, idt in ((2, torch.bfloat16, torch.bfloat16), (4, torch.bfloat16, torch.bfloat16),
                        (2, torch.float32, torch.bfloat16), (2, torch.bfloat16, torch.float8_e4m3fn),
                        (4, torch.bfloat16, torch.float8_e4m3fn)):  # fmt: skip
        r = asyncio.run(bitwise_case(provider, device, iw, td, idt))
        print(f"bitwise: TP {iw} {td} -> {idt}: shards equal {r['shards_bitwise_equal']}, "
              f"logits equal {r['logits_equal']} ({r['update_s']:.3f} s)")  # fmt: skip
        results.append(r)
    (out / "bitwise.json").write_text(json.dumps(results, indent=1))
    ok = all(all(r["shards_bitwise_equal"]) and r["logits_equal"] is not False for r in results)
    cmd_base = [sys.executable, "-m", "asyncfabric", "bench", "weights", "--provider", provider,
                "--device", "cuda" if device != "cpu" else "cpu", "--impls",
                "asyncfabric,write_many,naive", "--repeats", str(a.repeats)]  # fmt: skip
    import subprocess

    for s in [x for x in a.sizes.split(",") if x.strip()]:
        for extra, tag in (([], ""), (["--fp8", "--impls", "asyncfabric,write_many"], "-fp8")):
            cmd = [*cmd_base, "--sizes", s, "--json", str(out / f"bench-{s}{tag}.json"), *extra]
            print("running:", " ".join(cmd), flush=True)
            rc = subprocess.call(cmd)
            if rc:
                print(f"gpu_weights: the {s} GB{tag} benchmark failed (exit {rc})")
                ok = False
    print("gpu_weights:", "all bitwise checks passed" if ok else "FAILED (see above)")
    return 0 if ok else 1


async def _opens(provider: str) -> None:
    async with af.Engine(provider):
        pass


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
