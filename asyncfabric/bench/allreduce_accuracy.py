"""``asyncfabric bench allreduce --accuracy``: error of the int8 all-reduce, and of bf16,
against an exact fp32 reduction, on random data and on a small Llama's real partial sums;
then (``--decode``) greedy decoding of that Llama tensor-parallel over 2 processes.

asyncfabric bench allreduce --accuracy                  # the error table
asyncfabric bench allreduce --accuracy --decode         # and the decoding check
asyncfabric bench allreduce --accuracy --ranks 2,4 --json acc.json

Data, P partial tensors (one a rank), fp32:

* ``normal``: 2^20 standard normal values a rank; ``heavy-tailed``: normal times
  lognormal, so that a block's outlier sets a coarse step for its neighbours (trained
  models' activations have such outlier features; a random-weight model's do not);
* ``llama-o`` / ``llama-down``: the partial outputs of the row-parallel ``o_proj`` and
  ``down_proj`` of every layer of the Llama of :class:`~asyncfabric.bench.tp_llama.Spec`
  split over P ranks (:class:`~asyncfabric.bench.tp_llama.LocalSum` records them) for a
  prefill of ``--prompt`` tokens: exactly what tensor parallelism all-reduces.

Paths, each against the exact fp32 sum in rank order:

* ``bf16``: a plain bf16 all-reduce as a ring does it: every partial rounded to bf16,
  every addition rounded to bf16 (computed here, not sent);
* ``af-bf16``: ``all_reduce(quant=None)`` on the bf16-rounded partials (fp32 accumulation,
  one rounding), real engines;
* ``int8``: ``all_reduce(quant="int8")`` on the fp32 partials, real engines;
* ``int8-bf16``: ``all_reduce(quant="int8")`` on the bf16-rounded partials.

Errors: max |got - exact| and relative RMS, sqrt(mean((got - exact)^2) / mean(exact^2)).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import numpy as np
import torch

PATHS = ("bf16", "af-bf16", "int8", "int8-bf16")


def llama_partials(spec: Any, world: int, tokens: int) -> dict[str, list[torch.Tensor]]:
    """Per rank: the o_proj partials of every layer (flattened, concatenated), and the
    down_proj partials, of a ``tokens``-token prefill split over ``world`` ranks."""
    from .tp_llama import LocalSum, Shard, build_model

    spec = replace(spec, prompt=tokens)
    model = build_model(spec)
    g = torch.Generator().manual_seed(spec.seed + 2)
    ids = torch.randint(0, spec.vocab, (tokens,), generator=g)
    record: list[list[torch.Tensor]] = []
    ls = LocalSum(world, record)
    shards = [Shard(model, r, world) for r in range(world)]

    async def run() -> None:
        await asyncio.gather(
            *(shards[r].forward(ids, 0, shards[r].new_cache(), ls.reducer(r)) for r in range(world))
        )

    with torch.no_grad():
        asyncio.run(run())
    # two reductions a layer: o_proj, then down_proj
    out: dict[str, list[torch.Tensor]] = {}
    for name, calls in (("llama-o", record[0::2]), ("llama-down", record[1::2])):
        out[name] = [torch.cat([c[r].reshape(-1) for c in calls]) for r in range(world)]
    return out


def _errors(got: torch.Tensor, exact: np.ndarray) -> dict[str, float]:
    err = got.float().numpy().astype(np.float64) - exact
    return {
        "max_abs": float(np.abs(err).max()),
        "rel_rms": float(np.sqrt(np.mean(err**2) / np.mean(exact**2))),
    }


async def _measure(
    parts: list[torch.Tensor], views: list[Any], paths: tuple[str, ...], block: int
) -> dict[str, dict[str, float]]:
    from asyncfabric.collectives import all_reduce

    acc = parts[0].clone()
    for p in parts[1:]:
        acc += p
    exact = acc.numpy().astype(np.float64)
    res: dict[str, dict[str, float]] = {}
    for path in paths:
        if path == "bf16":
            b = parts[0].bfloat16()
            for p in parts[1:]:
                b = b + p.bfloat16()  # torch: add in fp32, round to bf16, as a ring step does
            res[path] = _errors(b, exact)
            continue
        quant = None if path == "af-bf16" else "int8"
        ins = [p.bfloat16() if path.endswith("bf16") else p.clone() for p in parts]
        await asyncio.gather(
            *(
                all_reduce(ins[i], views[i], quant=quant, block=block, timeout=120)
                for i in range(len(views))
            )
        )
        res[path] = _errors(ins[0], exact)
    res["exact"] = {"rms": float(np.sqrt(np.mean(exact**2))), "max_abs": float(np.abs(exact).max())}
    return res


def error_table(
    ranks: list[int], n: int, spec: Any, prompt: int, provider: str = "shm"
) -> list[dict[str, Any]]:
    from asyncfabric.testing.groups import local_views

    rows: list[dict[str, Any]] = []
    for world in ranks:
        data: dict[str, list[torch.Tensor]] = {}
        g = torch.Generator().manual_seed(world)
        data["normal"] = [torch.randn(n, generator=g) for _ in range(world)]
        data["heavy-tailed"] = [
            torch.randn(n, generator=g) * torch.randn(n, generator=g).exp() for _ in range(world)
        ]
        data.update(llama_partials(spec, world, prompt))

        async def run(data: dict[str, list[torch.Tensor]] = data, world: int = world) -> None:
            async with local_views(world, provider) as views:
                for name, parts in data.items():
                    r = await _measure(parts, views, PATHS, spec.block)
                    rows.append({"data": name, "ranks": world, "values": parts[0].numel(), **r})

        asyncio.run(run())
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    head = ["data", "P", "values", "exact RMS"] + [f"{p} max abs / rel RMS" for p in PATHS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["data"], str(r["ranks"]), str(r["values"]), f"{r['exact']['rms']:.3g}"]
        cells += [f"{r[p]['max_abs']:.3g} / {r[p]['rel_rms']:.2e}" for p in PATHS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _decode_summary(d: dict[str, Any]) -> str:
    s = d["spec"]
    lines = [
        f"Llama hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads "
        f"({s['kv_heads']} KV), MLP {s['intermediate']}, vocab {s['vocab']}, seed {s['seed']}, "
        f"fp32; tensor-parallel over {d['world']} processes ({d['provider']}), "
        f"prompt {s['prompt']}, {s['tokens']} tokens greedy"
        + (f", trained {s['train_steps']} steps on a Markov chain" if s["train_steps"] else ""),
        f"  one unsplit shard vs HF forward: max |logit diff| {d['hf_max_logit_diff_1rank']:.2e}",
        f"  quant=None vs HF (one process): tokens agree {d['exact_vs_hf_agreement']:.1%}, "
        f"max |logit diff| {d['exact_vs_hf_max_logit_diff']:.2e}",
        f"  quant=None vs the same split summed in one process: "
        f"{'identical' if d['exact_equals_local_sum'] else 'DIFFERENT'} tokens",
        f"  exact run's top-1 minus top-2 logit: min {d['exact_top2_gap_min']:.3g}, "
        f"median {d['exact_top2_gap_median']:.3g}; top-1 probability median "
        f"{d['exact_top1_prob_median']:.3g}",
    ]
    for path in ("int8", "bf16"):
        r = d[path]
        first = r["first_divergence"]
        name = f"int8 (block {s['block']})" if path == "int8" else path
        lines.append(
            f"  {name} vs quant=None: free-running tokens agree {r['agreement']:.1%} "
            f"(first divergence: {'none' if first is None else f'token {first}'}); "
            f"teacher-forced top-1 {r['forced_top1']:.1%}, KL mean {r['kl_mean']:.2e} "
            f"nats, max {r['kl_max']:.2e}"
        )
    return "\n".join(lines)


def _decode_table(ds: list[dict[str, Any]]) -> str:
    """One row a seed, then the mean: the table of docs/collectives.md."""
    cols = [("int8", "agreement"), ("int8", "forced_top1"), ("int8", "kl_mean")]
    cols += [("bf16", "agreement"), ("bf16", "forced_top1"), ("bf16", "kl_mean")]
    head = ["seed", "None = HF"] + [f"{p} {k}" for p, k in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(k: str, v: float) -> str:
        return f"{v:.2e}" if k == "kl_mean" else f"{v:.1%}"

    for d in ds:
        row = [str(d["spec"]["seed"]), f"{d['exact_vs_hf_agreement']:.1%}"]
        row += [cell(k, d[p][k]) for p, k in cols]
        lines.append("| " + " | ".join(row) + " |")
    mean = ["mean", f"{np.mean([d['exact_vs_hf_agreement'] for d in ds]):.1%}"]
    mean += [cell(k, float(np.mean([d[p][k] for d in ds]))) for p, k in cols]
    lines.append("| " + " | ".join(mean) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .._cli import CliParser
    from .tp_llama import Spec, tp_check

    p = CliParser(
        prog="asyncfabric bench allreduce --accuracy", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--ranks", default="2,4", help="world sizes of the error table (default 2,4)")
    p.add_argument("--n", type=int, default=1 << 20, help="values a rank, normal data")
    p.add_argument("--prompt", type=int, default=128, help="prefill tokens of the Llama data")
    p.add_argument("--provider", default="shm", help="libfabric provider (default shm)")
    p.add_argument("--hidden", type=int, default=Spec.hidden)
    p.add_argument("--layers", type=int, default=Spec.layers)
    p.add_argument(
        "--seeds",
        default="0",
        help="model seeds, comma-separated: the table uses the first, --decode runs each "
        "(default 0)",
    )
    p.add_argument("--decode", action="store_true", help="also the tensor-parallel decoding check")
    p.add_argument("--block", type=int, default=Spec.block, help="values per int8 scale (32)")
    p.add_argument("--tokens", type=int, default=Spec.tokens, help="decoded tokens (--decode)")
    p.add_argument(
        "--train",
        type=int,
        default=0,
        help="--decode on a model trained this many steps on a synthetic Markov chain "
        "(tp_llama.Chain: confident predictions, as trained models make) instead of the "
        "random-weight one (default 0: random weights)",
    )
    p.add_argument("--no-table", action="store_true", help="skip the error table")
    p.add_argument("--json", help="write the results to this JSON file")
    a = p.parse_args(argv)
    try:
        ranks = [int(r) for r in a.ranks.split(",")]
    except ValueError:
        p.error(f"--ranks: not a list of world sizes: {a.ranks!r} (example: 2,4)")
    try:
        seeds = [int(x) for x in a.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: not a list of integers: {a.seeds!r} (example: 0,1,2)")
    spec = Spec(hidden=a.hidden, layers=a.layers, seed=seeds[0], tokens=a.tokens, block=a.block)
    torch.set_num_threads(spec.threads)
    out: dict[str, Any] = {"suite": "allreduce-accuracy"}
    if not a.no_table:
        rows = error_table(ranks, a.n, spec, a.prompt, a.provider)
        out["rows"] = rows
        print(f"all-reduce error against the exact fp32 sum (Llama: {spec})")
        print(_table(rows))
    if a.decode:
        out["decode"] = []
        for seed in seeds:
            dspec = replace(spec, seed=seed, train_steps=a.train)
            d = tp_check(dspec, world=2, provider=a.provider)
            out["decode"].append(d)
            print(_decode_summary(d), flush=True)
        if len(seeds) > 1:
            print(_decode_table(out["decode"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0
