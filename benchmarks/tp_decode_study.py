"""Why int8 free-running decoding drifts from the exact run: formats, gaps, model configs.

python benchmarks/tp_decode_study.py [--seeds 0-7] [--init 0.02,0.1] [--json out.json]

The tensor-parallel Llama of ``asyncfabric/bench/tp_llama.py`` (P = 2, fp32) decoded in
one process (:func:`emu_sum`: both shards as tasks of one loop, a ``LocalSum``), with
the all-reduce's wire format applied to every partial before the fp32 sum in rank
order. This is the one-shot path every reduction of that model takes (at most 32 KiB a
call): each rank's tensor quantized in blocks from its first value, dequantized, summed
in rank order in fp32, and (the stock kernel) the sum quantized once more; ``-norq``
formats leave that last step out. For the stock format (block 32, scale = absmax / 127 rounded up
to bf16, q = round-half-even(x * (1 / scale), exact product: an FMA) clamped to +-127) that is the native
kernel's arithmetic exactly (every product q * scale is exact in fp32): :func:`check`
compares it with ``_kernels.reduce`` bit for bit before anything is measured. The other
formats (fp32 scales, smaller blocks) are what the kernel would compute with them.

Per (model config, seed): the exact run (fp32 sum), then per format a free-running and a
teacher-forced decode; agreement, forced top-1, KL(exact || path) over the forced steps,
the exact run's top-1 minus top-2 logit at every step and at the steps where a format
chose differently, and how confident the exact run is (top-1 probability).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from asyncfabric.bench.tp_llama import (
    Chain,
    LocalSum,
    Shard,
    Spec,
    build_model,
    decode,
    kl,
    train,
)

# (kind, block, scale format, whether the one-shot sum is quantized once more)
Fmt = tuple[str, int, str, bool]
FORMATS: dict[str, Fmt | None] = {
    "exact": None,
    "int8-b32-bf16s": ("int8", 32, "bf16", True),  # the stock format and algorithm
    "int8-b32-bf16s-norq": ("int8", 32, "bf16", False),
    "int8-b32-fp32s": ("int8", 32, "fp32", True),
    "int8-b32-fp32s-norq": ("int8", 32, "fp32", False),
    "int8-b16-bf16s": ("int8", 16, "bf16", True),
    "int8-b8-bf16s": ("int8", 8, "bf16", True),
    "int8-b16-bf16s-norq": ("int8", 16, "bf16", False),
    "bf16": ("bf16", 0, "", False),
}


def _bf16_up(s: torch.Tensor) -> torch.Tensor:
    """fp32 -> the next bf16 at or above (the kernel's scale_bits), as fp32."""
    u = s.view(torch.int32)
    low = (u & 0xFFFF) != 0
    finite = (u & 0x7F800000) != 0x7F800000
    hi = (u & ~0xFFFF) + torch.where(low & finite, 0x10000, 0)
    return hi.to(torch.int32).view(torch.float32)


def wire(x: torch.Tensor, fmt: Fmt | None) -> torch.Tensor:
    """``x`` (fp32) as the receiver sees it after the wire format ``fmt``."""
    if fmt is None:
        return x
    kind, block, scale_fmt, _ = fmt
    if kind == "bf16":
        return x.bfloat16().float()
    flat = x.reshape(-1)
    n = flat.numel()
    pad = (-n) % block
    xb = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    scale = xb.abs().amax(1) / 127.0
    if scale_fmt == "bf16":
        scale = _bf16_up(scale)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    # the kernel's x * inv + magic is one FMA: the exact product, rounded half to even
    q = torch.round(xb.double() * inv.double()[:, None]).clamp(-127, 127).float()
    return (q * scale[:, None]).reshape(-1)[:n].view_as(x)


def emu_sum(world: int, fmt: Fmt | None) -> LocalSum:
    """P shards in one loop; partials through ``fmt``, then summed in rank order in fp32
    (bf16: the fp32 sum rounded once to bf16, as ``all_reduce(quant=None)`` on bf16)."""

    def total(acc: torch.Tensor) -> torch.Tensor:
        if fmt is not None and fmt[0] == "bf16":
            return acc.bfloat16().float()
        if fmt is not None and fmt[3]:  # the sum quantized again
            return wire(acc, fmt)
        return acc

    return LocalSum(world, part=lambda x: wire(x.float().contiguous(), fmt), total=total)


def check() -> None:
    """The stock emulation against the native kernel, bit for bit (P = 2, one-shot)."""
    from asyncfabric.collectives import _kernels as K
    from asyncfabric.collectives.layout import align8
    from asyncfabric.collectives.tensors import F32

    g = torch.Generator().manual_seed(7)
    for n in (1, 31, 512, 8192 + 5):
        xs = [torch.randn(n, generator=g) * torch.randn(n, generator=g).exp() for _ in range(2)]
        xs[0][: min(n, 40)] = 0.0  # an all-zero block
        bufs = [torch.zeros(align8(n) + 2 * (-(-n // 32)) + 8, dtype=torch.uint8) for _ in xs]
        for x, b in zip(xs, bufs):
            K.quantize(x.data_ptr(), F32, n, 32, b.data_ptr(), b.data_ptr() + align8(n))
        y = torch.empty(n)
        K.reduce([b.data_ptr() for b in bufs], -1, F32, True, n, 32, 0, y.data_ptr())
        f = FORMATS["int8-b32-bf16s"]
        emu = wire(wire(xs[0], f) + wire(xs[1], f), f)
        if not torch.equal(y, emu):
            raise SystemExit(f"emulation differs from the kernel at n={n}: {(y - emu).abs().max()}")


def build(spec: Spec, init: float, tied: bool = False) -> Any:
    """The random-weight model of ``spec`` with this ``initializer_range`` (training, if
    any, is the study's own step)."""
    return build_model(replace(spec, train_steps=0), init=init, tied=tied)


async def _decode_all(
    shards: list[Shard], fmt: Any, prompt: torch.Tensor, n: int, forced: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    es = emu_sum(len(shards), fmt)
    res = await asyncio.gather(
        *(decode(s, es.reducer(r), prompt, n, forced) for r, s in enumerate(shards))
    )
    return res[0]


_MODELS: dict[tuple[Any, ...], tuple[Any, list[float]]] = {}


def study(
    spec: Spec,
    init: float,
    formats: list[str],
    tied: bool = False,
    trained: int = 0,
    prompt_seed: int | None = None,
) -> dict[str, Any]:
    key = (spec, init, tied, trained)
    if key not in _MODELS:  # one model a seed, however many prompts
        model = build(spec, init, tied)
        losses = train(model, Chain(spec.vocab), trained, spec.seed) if trained else []
        _MODELS.clear()
        _MODELS[key] = (model, losses)
    model, losses = _MODELS[key]
    g = torch.Generator().manual_seed(spec.seed + 1 if prompt_seed is None else prompt_seed)
    if trained:
        prompt = Chain(spec.vocab).sample(1, spec.prompt, g)[0]
    else:
        prompt = torch.randint(0, spec.vocab, (spec.prompt,), generator=g)
    shards = [Shard(model, r, 2) for r in range(2)]
    with torch.no_grad():
        exact, ex_logits = asyncio.run(_decode_all(shards, None, prompt, spec.tokens))
        top2 = ex_logits.topk(2, -1).values
        gap = top2[:, 0] - top2[:, 1]
        p1 = ex_logits.softmax(-1).max(-1).values
        out: dict[str, Any] = {
            "init": init,
            "tied": tied,
            "trained_steps": trained,
            "loss_last10": float(np.mean(losses[-10:])) if losses else None,
            "seed": spec.seed,
            "prompt_seed": prompt_seed,
            "logit_std": float(ex_logits.std(-1).mean()),
            "gap_median": float(gap.median()),
            "gap_min": float(gap.min()),
            "p1_median": float(p1.median()),
            "distinct_tokens": int(exact.unique().numel()),
        }
        for name in formats:
            fmt = FORMATS[name]
            free, _ = asyncio.run(_decode_all(shards, fmt, prompt, spec.tokens))
            ftok, flog = asyncio.run(_decode_all(shards, fmt, prompt, spec.tokens, exact))
            flips = (ftok != exact).nonzero().reshape(-1)
            div = (free != exact).nonzero().reshape(-1)
            out[name] = {
                "agreement": float((free == exact).float().mean()),
                "first_divergence": int(div[0]) if len(div) else None,
                "gap_at_first_divergence": float(gap[div[0]]) if len(div) else None,
                "forced_top1": float((ftok == exact).float().mean()),
                "kl_mean": float(kl(ex_logits, flog).mean()),
                "logit_err_rms": float((flog - ex_logits).pow(2).mean().sqrt()),
                "gaps_at_flips": [float(gap[i]) for i in flips],
            }
    return out


def _seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0-7")
    p.add_argument("--init", default="0.02", help="initializer_range values (0.02: stock)")
    p.add_argument("--formats", default=",".join(k for k in FORMATS if k != "exact"))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--tied", action="store_true", help="LM head tied to the embeddings")
    p.add_argument("--prompts", type=int, default=1, help="prompts a model (default 1)")
    p.add_argument(
        "--trained", type=int, default=0, help="train this many steps on a Markov chain first"
    )
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(1)
    check()
    formats = a.formats.split(",")
    rows = []
    for init in [float(x) for x in a.init.split(",")]:
        for seed, j in [(s, j) for s in _seeds(a.seeds) for j in range(a.prompts)]:
            t0 = time.perf_counter()
            spec = replace(Spec(), seed=seed, tokens=a.tokens)
            ps = None if a.prompts == 1 else 1000 * seed + j
            r = study(spec, init, formats, a.tied, a.trained, ps)
            rows.append(r)
            cells = " ".join(
                f"{f}:{r[f]['agreement']:.0%}/{r[f]['forced_top1']:.0%}/{r[f]['kl_mean']:.1e}"
                for f in formats
            )
            if r["loss_last10"] is not None:
                print(f"  trained {a.trained} steps, loss {r['loss_last10']:.3f}", flush=True)
            print(f"init {init} seed {seed}/{j} gap med {r['gap_median']:.3f} p1 med "
                  f"{r['p1_median']:.3f} std {r['logit_std']:.2f} distinct "
                  f"{r['distinct_tokens']} | {cells} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)  # fmt: skip
        sub = [r for r in rows if r["init"] == init]
        print(f"== init {init} mean over {len(sub)} seeds: gap median "
              f"{statistics.median(r['gap_median'] for r in sub):.3f}, p1 median "
              f"{statistics.median(r['p1_median'] for r in sub):.3f}")  # fmt: skip
        for f in formats:
            gaps = [g for r in sub for g in r[f]["gaps_at_flips"]]
            print(f"   {f:16} free {np.mean([r[f]['agreement'] for r in sub]):6.1%}  forced "
                  f"{np.mean([r[f]['forced_top1'] for r in sub]):6.1%}  KL "
                  f"{np.mean([r[f]['kl_mean'] for r in sub]):.2e}  logit err "
                  f"{np.mean([r[f]['logit_err_rms'] for r in sub]):.2e}  flips {len(gaps)}, "
                  f"their gaps median {np.median(gaps) if gaps else float('nan'):.4f} "
                  f"max {max(gaps) if gaps else float('nan'):.4f}", flush=True)  # fmt: skip
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
